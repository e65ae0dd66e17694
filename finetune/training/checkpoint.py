"""Training checkpoints: written into a temporary folder and renamed into place, so one either exists whole or not.

A checkpoint folder ``checkpoint-<step>/`` holds the trainable weights (``trainable.safetensors``), the optimizer
and scheduler state, every process's random number generator state, and ``state.json`` (step, counters, log
history) written last. Only folders named ``checkpoint-<step>`` with a ``state.json`` count as complete; the
temporary ``.checkpoint-<step>.tmp`` folders a killed run leaves behind are ignored and cleaned up.

The optimizer state (``optimizer.pt``, AdamW: twice the trainable weights in fp32) is what makes a checkpoint
continuable exactly. It stays while the run can go on: in the checkpoints of a running or interrupted run, and of a
finished run that stopped early (max_minutes, early stopping), which ``--resume`` continues. When a run completes
its planned steps nothing is left to continue, and ``drop_optimizer_state`` removes it from the final folder's
checkpoints; ``to_resume`` refuses such a checkpoint rather than continue it with a fresh optimizer.

Also here: the run's ``TrainState`` (state.json), which checkpoint a run continues from (``to_resume``), and
saving the adapter or model folder (``save_model_dir``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.errors import UserError

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
_NAME = re.compile(r"checkpoint-(\d+)")
# Settings that can change between an interrupted run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"max_minutes", "eval_every", "save_every", "keep_checkpoints", "early_stopping_patience",
                     "threads", "log_every"}


@dataclass
class TrainState:
    """What a run has done so far: saved as each checkpoint's state.json, restored when it resumes."""

    fingerprint: str                  # of the settings and data that decide what the run computes
    micro_batches_per_step: int
    processes: int | None = None      # that wrote it (None: a checkpoint of an older finetune)
    step: int = 0                     # optimizer steps done
    tokens: int = 0                   # input tokens seen
    elapsed: float = 0.0              # wall-clock seconds, over every session of the run
    train_seconds: float = 0.0        # seconds inside training steps
    best_val_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0                # validations since the best one (early stopping)
    last_val_loss: float | None = None
    last_val_reward: dict[str, float] | None = None  # preference objectives: reward accuracy and margin
    last_loss: float | None = None    # of the last step
    window_loss: float | None = None  # of the steps in the last log line
    history: list[dict[str, Any]] = field(default_factory=list)  # the log entries so far

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        """From a state.json; those of older versions lack the optional keys (window_loss, last_val_reward)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def save(root: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically: ``write_files(tmp)`` fills the folder, then state.json, then one rename."""
    from finetune.run.runs import atomic_dir

    final = Path(root) / f"checkpoint-{step}"
    # atomic_dir's temporary folder is a hidden '.checkpoint-<step>.*.tmp' sibling: never taken for a checkpoint,
    # and removed by prune() if a killed run leaves it behind. A step saved again (a resumed run) is replaced whole.
    with atomic_dir(final) as tmp:
        write_files(tmp)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and leftovers of interrupted saves."""
    for _, path in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).iterdir():
        if path.name.startswith(".checkpoint-") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)


def drop_optimizer_state(root: Path) -> int:
    """Remove the optimizer state from every complete checkpoint under ``root`` (a run that completed: nothing is
    left to continue); the weights, schedule and state.json stay. Returns the bytes freed."""
    freed = 0
    for _, path in complete(root):
        target = path / OPTIMIZER_FILE
        if target.exists():
            freed += target.stat().st_size
            target.unlink()
    return freed


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- resuming a run
def resume_fingerprint(recipe, data_fp: dict[str, str], micro_per_step: int) -> str:
    """What a checkpoint must match to be continued: every setting that changes the computation, and the data."""
    from finetune.run import runs

    train = recipe.train.model_dump(mode="json", exclude=RESUMABLE_CHANGES)
    return runs.fingerprint_json({"train": train, "model": recipe.model.model_dump(mode="json"), "seed": recipe.seed,
                                  "data": data_fp, "micro_batches_per_step": micro_per_step})


def to_resume(out: Path, work: Path, fingerprint: str, resume: bool, *, processes: int = 1, grad_accum: int = 1,
              fingerprint_for: Callable[[int], str] | None = None) -> tuple[Path | None, Path | None]:
    """(the checkpoint to continue from, as a path under ``work``; a finished folder to copy into ``work`` first).

    The work folder holds an interrupted run. ``out`` is continued only with --resume when it finished (a run
    stopped by max_minutes or early stopping), or when it never finished (written by an older finetune in place).
    A checkpoint written by another number of ``processes`` is continued when the micro-batches per step are the
    same (``fingerprint_for(micro_batches)`` is the fingerprint the run would have with them); otherwise refused,
    with the launch or grad_accum that continues it, before anything is touched. A checkpoint without optimizer
    state (a completed run's, see ``drop_optimizer_state``) is never continued: refused with --resume, else the
    run starts over.
    """
    finished = (out / "manifest.json").exists()
    folders = [work] + ([out] if resume or not finished else [])
    for folder in folders:
        found = latest(folder / "checkpoints")
        if found is None:
            continue
        saved = read_state(found)
        spent = not (found / OPTIMIZER_FILE).exists()  # a run that completed its steps keeps no optimizer state
        if spent and resume and folder == out and finished:
            raise UserError(f"--resume: {out} is a run that completed all its steps, and a completed run keeps no "
                            f"optimizer state ({found} has none), so it cannot be continued exactly. Train without "
                            "--resume to train again (with a larger train.max_steps, say); the finished run stays "
                            "until the new one succeeds.")
        if saved.get("fingerprint") != fingerprint:
            if (fingerprint_for is not None and saved.get("processes") not in (None, processes)
                    and fingerprint_for(saved["micro_batches_per_step"]) == saved.get("fingerprint")):
                _refuse_other_process_count(found, saved["processes"], saved["micro_batches_per_step"], processes,
                                            grad_accum)
            if resume:
                raise UserError(f"--resume: {found} was made with other settings (model, data, seed or train.* keys "
                                f"other than {sorted(RESUMABLE_CHANGES)}). Restore them, or train without --resume "
                                "to start over.")
            print(f"train: not resuming {found}: the recipe or data changed since; starting over", file=sys.stderr)
            continue
        if spent:  # not the checkpoint of a run that can go on: continuing it would not be the same run
            if resume:
                raise UserError(f"--resume: {found} has no optimizer state ({OPTIMIZER_FILE}), so it cannot be "
                                "continued exactly. Train without --resume to start over.")
            print(f"train: not resuming {found}: it has no optimizer state ({OPTIMIZER_FILE}); starting over",
                  file=sys.stderr)
            continue
        if folder == work:
            return found, None
        return work / "checkpoints" / found.name, out
    if resume:
        raise UserError(f"--resume: no complete checkpoint under {work / 'checkpoints'} or {out / 'checkpoints'}. "
                        "Run `finetune train RECIPE` without --resume.")
    return None, None


def _refuse_other_process_count(found: Path, ck_processes: int, ck_micro: int, processes: int,
                                grad_accum: int) -> None:
    """The same updates need the same micro-batches per step (grad_accum x processes): say how to get them."""
    if ck_micro % processes:
        counts = ", ".join(str(n) for n in range(1, ck_micro + 1) if ck_micro % n == 0)
        raise UserError(f"train: {processes} processes cannot split the {ck_micro} micro-batches per step of the run "
                        f"checkpointed in {found} (written by {ck_processes} processes); launch {counts} processes "
                        f"with train.grad_accum = {ck_micro} / processes, or delete {found.parent} to start over.")
    raise UserError(f"train: {found} was written by {ck_processes} processes ({ck_micro} micro-batches per step); "
                    f"this launch has {processes} with train.grad_accum={grad_accum}: add "
                    f"train.grad_accum={ck_micro // processes} to continue the same run, or launch {ck_processes} "
                    f"processes, or delete {found.parent} to start over.")


# ------------------------------------------------------------------------------ the weights and their state
def trainable_state(model) -> dict[str, Any]:
    """A CPU copy of the trainable parameters (the adapter, or every weight under full fine-tuning), whole and
    named as in the unwrapped model also when FSDP2 shards them (then every process must call it: a gather)."""
    from finetune.training import sharded

    return {sharded.canonical(n): sharded.full_tensor(p.detach()).to("cpu", copy=True)
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, Any]) -> None:
    import torch

    from finetune.training import sharded

    params = {sharded.canonical(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, value in state.items():
            sharded.copy_into(params[name], value)


def save_training(root: Path, state: TrainState, model, optimizer, scheduler, best_weights, accelerator,
                  keep: int, *, sharded_model: bool = False) -> None:
    """A checkpoint of the run under ``root`` (every process calls this; the main process writes). Under FSDP2
    (``sharded_model``) the weights and optimizer state are gathered whole first: the files are the same as a
    data-parallel run's, by parameter name for the optimizer state."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from finetune.training import sharded

    rng = rng_state()
    rng_all = [rng]
    if accelerator.num_processes > 1:
        rng_all = [None] * accelerator.num_processes
        dist.all_gather_object(rng_all, rng)
    weights = trainable_state(model)
    optim = sharded.optimizer_state(model, optimizer) if sharded_model else None
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            save_file(weights, str(folder / "trainable.safetensors"))
            if best_weights is not None:
                save_file(best_weights, str(folder / "best.safetensors"))
            torch.save(optim if optim is not None else optimizer.state_dict(), folder / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(rng_all, folder / "rng.pt")

        save(root, state.step, write, state.to_json(), keep)
    accelerator.wait_for_everyone()


def load_training(path: Path, model, optimizer, scheduler, rank: int, *, sharded_model: bool = False
                  ) -> tuple[TrainState, dict[str, Any] | None]:
    """Restore the weights, optimizer, scheduler and this process's RNG from checkpoint ``path``; returns the
    run's state and the best validation step's weights (adapters), if any. ``sharded_model``: FSDP2 (every
    process takes its shards of the whole weights and optimizer state)."""
    import torch
    from safetensors.torch import load_file

    from finetune.training import sharded

    load_trainable(model, load_file(str(path / "trainable.safetensors")))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    optim = torch.load(path / OPTIMIZER_FILE, weights_only=False)
    if sharded_model:
        sharded.load_optimizer_state(model, optimizer, optim)
    else:
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_all = torch.load(path / "rng.pt", weights_only=False)
    set_rng_state(rng_all[rank % len(rng_all)])
    return TrainState.from_json(read_state(path)), best


def save_model_dir(model, tokenizer, final_dir: Path, attn: str, step: int | None = None,
                   state_dict: dict[str, Any] | None = None) -> None:
    """Save the adapter or model (atomically); ``step`` marks a snapshot taken during training. ``state_dict``:
    the weights gathered whole (FSDP2), saved instead of the model's own (sharded) ones."""
    from finetune.run import runs
    from finetune.training import attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    swap = attn == attention.NAME and hasattr(base, "set_attn_implementation")
    if swap:  # our packed-batch attention is registered only inside training; saved configs name a standard one
        try:
            base.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA support (gpt-oss: attention sinks)
            base.set_attn_implementation("eager")
    try:
        with runs.atomic_dir(final_dir) as tmp:
            if state_dict is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            if step is not None:
                (Path(tmp) / "finetune_step.json").write_text(json.dumps({"step": step}))
    finally:
        if swap:
            base.set_attn_implementation(attn)
