"""A resume without a complete checkpoint says so. Interrupted runs (SIGKILL, Ctrl-C) resuming exactly:
tests/integration/test_train_interrupted.py."""

from __future__ import annotations

import pytest
from train_fixtures import prepared

from finetune import train


def test_resume_without_checkpoint_says_so(tmp_path, tiny_model_dir):
    from finetune.errors import UserError

    recipe = prepared(tmp_path, tiny_model_dir, max_steps=2)
    with pytest.raises(UserError, match="no complete checkpoint"):
        train.run(recipe, resume=True)


def test_a_completed_run_drops_its_optimizer_state_an_interrupted_one_keeps_it(tmp_path, tiny_model_dir, cli):
    """Killed at step 3 (an error from inside training), the run's checkpoints keep their optimizer state and the
    rerun continues to the uninterrupted run's adapter; once the run completes, its final folder's checkpoints hold
    no optimizer state, and --resume on it (also asking for more steps) says so in one line, exit 2. A run stopped
    early (max_minutes) is meant to be continued: it keeps the state."""
    import torch
    from safetensors.torch import load_file

    from finetune.errors import UserError
    from finetune.training import checkpoint as ckpt

    settings = dict(max_steps=6, batch_size=4, lr=1e-2, save_every=2, eval_every=1, keep_checkpoints=3)
    whole = prepared(tmp_path / "a", tiny_model_dir, **settings)
    train.run(whole)
    recipe = prepared(tmp_path / "b", tiny_model_dir, **settings)

    def crash(step: int, val_loss: float) -> bool:
        if step == 3:
            raise RuntimeError("killed")
        return False

    with pytest.raises(RuntimeError, match="killed"):
        train.run(recipe, on_eval=crash)
    out, work = recipe.run_dir("train"), recipe.run_dir() / ".train.partial"
    assert not out.exists() and (work / "checkpoints" / "checkpoint-2" / ckpt.OPTIMIZER_FILE).is_file()

    summary = train.run(recipe)  # an interrupted run with unchanged settings continues by itself
    assert summary["steps"] == 6 and summary["stop_reason"] == "completed" and not work.exists()
    found = ckpt.complete(out / "checkpoints")
    assert [step for step, _ in found] == [2, 4]
    for _, path in found:
        assert not (path / ckpt.OPTIMIZER_FILE).exists() and (path / "trainable.safetensors").is_file()
    a = load_file(str(whole.run_dir("train") / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    with pytest.raises(UserError, match="completed all its steps.*no optimizer state"):
        train.run(recipe, resume=True)
    for extra in ([], ["train.max_steps=8"]):
        code, _, err = cli("train", str(tmp_path / "b" / "t.yaml"), *extra, "--resume")
        lines = [ln for ln in err.splitlines() if "no optimizer state" in ln]
        assert code == 2 and len(lines) == 1 and "without --resume" in lines[0], err
    assert (out / "manifest.json").is_file() and (out / "adapter").is_dir()  # the finished run is untouched

    stopped = prepared(tmp_path / "c", tiny_model_dir, max_steps=6, max_minutes=1e-6, save_every=2)
    assert train.run(stopped)["stop_reason"] == "max_minutes"
    assert (stopped.run_dir("train") / "checkpoints" / "checkpoint-1" / ckpt.OPTIMIZER_FILE).is_file()
