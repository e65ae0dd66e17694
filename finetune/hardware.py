"""This machine's compute, decided in one place: the device the stages run on and how many CPU threads a process
uses.

``threads`` is the one rule: the setting the user gave wins; otherwise the cores this process may run on, shared
evenly by the processes that run at once (training processes on one machine, the server's workers), capped where
more threads stop helping (llama.cpp).
"""

from __future__ import annotations

import os
from pathlib import Path

LLAMA_CPP_MAX_THREADS = 16  # llama.cpp decoding is memory-bound: more threads than this stop paying


def device() -> str:
    """"cuda" when a CUDA GPU is usable, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container or taskset may allow fewer than the
    machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads(explicit: int | None = None, *, sharing: int = 1, cap: int | None = None) -> int:
    """CPU threads for one process: ``explicit`` (the user's setting) when given, else this process's share of the
    cores when ``sharing`` processes run at once, at most ``cap``."""
    if explicit:
        return explicit
    share = max(1, cores() // max(1, sharing))
    return min(share, cap) if cap else share


# ------------------------------------------------------------------------------------------------ dtypes
def dtype_name(name: str, device: str = "cpu", *, fast_bf16: bool | None = None) -> str:
    """model.dtype on a device, the one "auto" rule: bfloat16 where it is fast and supported (a CUDA GPU with bf16,
    a CPU with AMX/AVX512-BF16), float16 on older GPUs, else float32. ``fast_bf16`` says whether the device computes
    in bf16 (default: ask this machine; ``finetune plan`` passes it for a device it is not running on)."""
    if name != "auto":
        return name
    cuda = device.startswith("cuda")
    if fast_bf16 is None:
        if cuda:
            import torch

            fast_bf16 = torch.cuda.is_bf16_supported()
        else:
            fast_bf16 = cpu_has_fast_bf16()
    if cuda:
        return "bfloat16" if fast_bf16 else "float16"
    return "bfloat16" if fast_bf16 else "float32"


def training_dtypes(name: str, method: str, device: str = "cpu", *,
                    fast_bf16: bool | None = None) -> tuple[str, str | None]:
    """(weights dtype, autocast dtype or None) for training: model.dtype as set, "auto" by ``dtype_name``'s rule,
    except full fine-tuning, which keeps fp32 master weights (pure bf16 weights lose small updates) and, on a GPU
    with bf16, runs the maths under bf16 autocast. Train loads by it; ``finetune plan`` estimates by it."""
    if name == "auto" and method == "full":
        cuda = device.startswith("cuda")
        if cuda and fast_bf16 is None:
            import torch

            fast_bf16 = torch.cuda.is_bf16_supported()
        return "float32", ("bfloat16" if cuda and fast_bf16 else None)
    return dtype_name(name, device, fast_bf16=fast_bf16), None


def torch_dtype(name: str, device: str = "cpu"):
    """model.dtype on a device as a torch dtype (``dtype_name``'s rule for "auto")."""
    import torch

    return getattr(torch, dtype_name(name, device))


def cpu_has_fast_bf16() -> bool:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))
