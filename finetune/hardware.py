"""This machine's compute, decided in one place: the device the stages run on and how many CPU threads a process
uses.

``threads`` is the one rule: the setting the user gave wins; otherwise the cores this process may run on, shared
evenly by the processes that run at once (training processes on one machine, the server's workers), capped where
more threads stop helping (llama.cpp).
"""

from __future__ import annotations

import os

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
