"""What a model's config.json refuses before any training. ``validate``, ``plan`` and ``train`` ask the same
questions, here, so a model that cannot go all the way stops before the hours of training, never at export:

- an image-text checkpoint whose language model cannot be trained alone (``finetune.image_text``);
- a Gemma 4 layout of shared key/value layers that llama.cpp would load differently from transformers;
- ``export.adapter_gguf`` for a model whose LoRA adapter llama.cpp cannot write (``finetune.gguf.convert``).
"""

from __future__ import annotations

from typing import Any

from finetune.errors import UserError

SLIDING, FULL = "sliding_attention", "full_attention"


def shared_kv_problem(config: dict[str, Any]) -> str | None:
    """Why llama.cpp could not run this Gemma 4 checkpoint's shared key/value layers as transformers does; None
    when it can (or the model shares none).

    Gemma 4's last ``num_kv_shared_layers`` layers reuse earlier layers' keys and values. Transformers reuses the
    last unshared layer of the same attention type; llama.cpp (its KV cache, for the gemma4 architecture) makes a
    shared sliding-window layer reuse the second-to-last unshared layer and a shared full-attention layer the last
    one. They agree only when the unshared layers end sliding, full, as Gemma 4's published configs do; otherwise
    the GGUF converts and then crashes llama.cpp (or computes something else)."""
    text = config.get("text_config") or config
    shared = int(text.get("num_kv_shared_layers") or 0)
    types = list(text.get("layer_types") or [])
    if not str(text.get("model_type", "")).startswith("gemma4") or not shared or not types:
        return None
    first_shared = len(types) - shared
    if first_shared >= 2 and types[first_shared - 2:first_shared] == [SLIDING, FULL]:
        return None
    return (f"its last {shared} layers share keys and values (num_kv_shared_layers) after unshared layers ending "
            f"{types[max(0, first_shared - 2):first_shared]}, a layout llama.cpp runs differently from transformers "
            f"(it needs them to end {[SLIDING, FULL]}, as Gemma 4's published checkpoints do), so its GGUF would not "
            "behave like the trained model; use a Gemma 4 checkpoint with the published layout")


def problems(config: dict[str, Any], *, method: str, adapter_gguf: bool, where: str = "model.id") -> list[str]:
    """Every refusal of this model (its config.json as a dict) for the recipe's training method and export, each a
    one-line message naming the key and the fix. ``download=False``: an uncached llama.cpp source answers nothing
    here (export checks again when it has it)."""
    from finetune import image_text
    from finetune.gguf import convert

    found = []
    image_text_problem = image_text.text_model_problem(config)
    if image_text_problem:
        found.append(f"{where}: {image_text_problem}.")
    layout = shared_kv_problem(config)
    if layout:
        found.append(f"{where}: {layout}.")
    if adapter_gguf:
        try:
            convert.check_adapter_gguf(config, method=method, download=False)
        except UserError as exc:
            found.append(str(exc))
    return found


def check(config: dict[str, Any], *, method: str, adapter_gguf: bool, where: str = "model.id") -> None:
    """Refuse (plan, train) a model that cannot go all the way: every problem at once, in one message."""
    found = problems(config, method=method, adapter_gguf=adapter_gguf, where=where)
    if found:
        raise UserError(" ".join(found))


# ------------------------------------------------------------------------- settings that run, but should say so
def training_notes(recipe, device_type: str, plan: list, micro_batches_per_step: int) -> list[str]:
    """One line per setting that trains, but not as the user likely expects: a half-precision dtype that this CPU
    only emulates, and a grad_accum that leaves one optimizer step per epoch. ``plan`` is the run's optimizer
    steps (``finetune.training.batching.schedule``)."""
    from finetune import hardware

    t = recipe.train
    found = []
    dtype = hardware.training_dtypes(recipe.model.dtype, t.method, device_type)[0]
    if device_type == "cpu" and dtype == "float16":
        found.append("model.dtype float16 on a CPU: most CPUs emulate float16 matrix products, so training runs "
                     "many times slower than in float32 (about 3 tokens/s was seen on a 135M model); set "
                     "model.dtype: auto (float32, or bfloat16 where the CPU computes it)")
    elif device_type == "cpu" and dtype == "bfloat16" and not hardware.cpu_has_fast_bf16():
        found.append("model.dtype bfloat16 on a CPU without AMX or AVX512-BF16: bfloat16 matrix products are "
                     "emulated, so training runs many times slower than in float32; set model.dtype: auto")
    if plan and plan[0].steps_in_epoch == 1 and len(plan[0].micro_batches) < micro_batches_per_step:
        have = len(plan[0].micro_batches)
        found.append(f"train.grad_accum is {t.grad_accum}, but an epoch holds only {have} micro-batch"
                     f"{'es' if have > 1 else ''} of train.batch_size {t.batch_size}: one optimizer step per epoch "
                     f"({len(plan)} in all). Lower train.grad_accum to {have} or less for more steps")
    return found


def say_training_notes(recipe, device_type: str, plan: list, micro_batches_per_step: int, *, main: bool) -> None:
    """Print ``training_notes`` as `train: note: ...` lines (the main process only)."""
    import sys

    for note in training_notes(recipe, device_type, plan, micro_batches_per_step) if main else []:
        print(f"train: note: {note}", file=sys.stderr)


def check_settings(recipe, device_type: str) -> None:
    """Settings this machine cannot run, refused before any data is read or any output touched."""
    from finetune import models
    from finetune.training import model_setup

    t = recipe.train
    if t.method == "qlora" and device_type != "cuda":
        raise UserError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); none was found. "
                        "Use train.method=lora on this machine (it fits: the CPU has system memory).")
    if t.optimizer == "adamw_8bit" and device_type != "cuda":
        raise UserError("train.optimizer: adamw_8bit needs a CUDA GPU (bitsandbytes); use train.optimizer=adamw.")
    if t.kernels == "liger" and (device_type != "cuda" or not model_setup.installed("liger_kernel")):
        raise UserError("train.kernels: liger needs a CUDA GPU and `pip install liger-kernel`; use train.kernels=none.")
    models.check_attention(recipe.model.attn_implementation, device_type)
