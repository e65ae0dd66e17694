"""What a finished training run leaves in its work folder: the best step's weights put in place, the adapter or model
folder, summary.json (the figures ``finetune train`` prints and eval and the cards read) and the stage's record."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.run import artifacts, runs
from finetune.training import checkpoint as ckpt
from finetune.training import sharded
from finetune.training.model_setup import ADAPTER_METHODS

if TYPE_CHECKING:
    from finetune.train import _Training as Training

BEST_FULL_DIR = "best-model"  # full fine-tuning: the best validation step's weights, until the run ends


def best_weights(tr: Training) -> tuple[int, Path | None]:
    """Put the best validation step's weights in place: (their step, the saved full model folder to use, if any)."""
    t, st = tr.recipe.train, tr.state
    if tr.best_weights is not None and st.best_step != st.step:
        ckpt.load_trainable(tr.raw_model, tr.best_weights)
        return st.best_step, None
    if t.method == "full" and st.best_step not in (None, st.step):
        marker = tr.work / BEST_FULL_DIR / "finetune_step.json"
        if marker.exists() and json.loads(marker.read_text()).get("step") == st.best_step:
            return st.best_step, tr.work / BEST_FULL_DIR
    return st.step, None


def summary(tr: Training, plan, stop_reason: str, packing_off: str | None, val_rows, weights_step: int
             ) -> dict[str, Any]:
    t, st, built = tr.recipe.train, tr.state, tr.built
    raw = tr.raw_model
    return {
        "steps": st.step, "planned_steps": len(plan), "tokens_seen": st.tokens,
        "seconds": round(st.elapsed, 2), "train_seconds": round(st.train_seconds, 2),
        "tokens_per_s": round(st.tokens / max(st.train_seconds, 1e-9), 2),
        "peak_memory_mb": peak_memory_mb(tr.accelerator.device.type),
        "best_step": st.best_step, "best_val_loss": st.best_val_loss,
        "final_train_loss": st.window_loss if st.window_loss is not None else st.last_loss,
        "final_val_loss": st.last_val_loss,
        "stopped_early": stop_reason not in ("completed",), "stop_reason": stop_reason, "weights_step": weights_step,
        "method": t.method, "trainable_params": tr.n_trainable, "device": str(tr.accelerator.device),
        "processes": tr.accelerator.num_processes, "sharding": "fsdp2" if tr.sharded else None,
        "fsdp_wrapped_layers": tr.wrapped,
        "attn_implementation": built.attn, "kernels": built.kernels, "packing": tr.ctx.packing,
        "packing_off_reason": packing_off,
        "autocast_dtype": str(built.autocast_dtype).removeprefix("torch.") if built.autocast_dtype else None,
        "gradient_checkpointing": bool(tr.gc_on),
        "base_dtype": "nf4" if t.method == "qlora" else params_dtype(p for p in raw.parameters() if not p.requires_grad),
        "trainable_dtype": params_dtype(p for p in raw.parameters() if p.requires_grad),
        "validation_rows": len(val_rows), "objective": t.objective,
        "validation_reward": st.last_val_reward,
        "validation": "on" if val_rows else "off: the validation split is empty (no validation loss, early stopping "
                                             "or best-step selection; the final step's weights are saved)",
    }


def final_name(method: str) -> str:
    return "model" if method == "full" else "adapter"


def gathered(tr: Training) -> dict[str, Any] | None:
    """FSDP2: the weights to save, gathered whole (every process must call this; the main process gets them):
    the adapter's trainable weights, or the full model's state dict. None when nothing is sharded."""
    if not tr.sharded:
        return None
    if tr.recipe.train.method in ADAPTER_METHODS:
        return ckpt.trainable_state(tr.raw_model)
    return sharded.full_model_state(tr.raw_model)


def write_outputs(tr: Training, summary: dict[str, Any], best_full: Path | None,
                   state_dict: dict[str, Any] | None = None) -> None:
    """The adapter or model folder and summary.json, in the work folder (main process); ``state_dict``: the
    weights gathered whole (FSDP2), an ordinary peft adapter or Hugging Face checkpoint once saved."""
    final_dir = tr.work / final_name(tr.recipe.train.method)
    if best_full is not None:
        shutil.rmtree(final_dir, ignore_errors=True)
        best_full.rename(final_dir)
        (final_dir / "finetune_step.json").unlink(missing_ok=True)
    else:
        ckpt.save_model_dir(tr.raw_model, tr.tokenizer, final_dir, tr.built.attn, state_dict=state_dict)
    shutil.rmtree(tr.work / BEST_FULL_DIR, ignore_errors=True)
    runs.atomic_write_json(tr.work / "summary.json", summary)


def trained_record(out: Path, method: str, base_model: Path) -> artifacts.Trained:
    final = out / final_name(method)
    return artifacts.Trained(method=method, adapter=final if method != "full" else None,
                             model=final if method == "full" else None, base_model=base_model,
                             log=out / "log.jsonl", summary=out / "summary.json", tensorboard=out / "tb")



def peak_memory_mb(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def params_dtype(params) -> str | None:
    p = next(iter(params), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")
