"""Interrupted training resumes exactly: SIGKILL of a training child process mid-run, and Ctrl-C; each against an
uninterrupted run. A resume without a checkpoint: tests/unit/test_train_resume.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from train_fixtures import prepared, train_losses, val_losses

from finetune import train

# dropout on: the resumed run only matches if the random number generators are restored too
SETTINGS = dict(max_steps=10, batch_size=4, lr=1e-2, log_every=1, eval_every=3, save_every=4, keep_checkpoints=2,
                lora={"r": 8, "alpha": 16, "dropout": 0.2})


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(ref_out, out):
    import torch

    for read in (train_losses, val_losses):
        got, want = read(out / "log.jsonl"), read(ref_out / "log.jsonl")
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-4)
    ref, got = _adapter(ref_out), _adapter(out)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-3)


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, repo_root):
    ref = prepared(tmp_path / "ref", tiny_model_dir, **SETTINGS)
    ref_summary = train.run(ref)

    victim = prepared(tmp_path / "victim", tiny_model_dir, **SETTINGS)
    out = victim.run_dir("train")
    # A real process, really killed: at step 6 (checkpoint-4 written, checkpoint-8 not yet), from inside training.
    script = (
        "import os, signal\n"
        "from finetune import recipe, train\n"
        f"r = recipe.load({str(tmp_path / 'victim' / 't.yaml')!r})\n"
        "def on_eval(step, val):\n"
        "    if step == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return False\n"
        "train.run(r, on_eval=on_eval)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    # an unfinished run lives beside the train folder until it finishes
    partial = victim.run_dir() / ".train.partial"
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["checkpoint-4"]
    # what a crash in the middle of a later save leaves behind must never be picked up
    (partial / "checkpoints" / ".checkpoint-8.tmp").mkdir()
    (partial / "checkpoints" / ".checkpoint-8.tmp" / "trainable.safetensors").write_bytes(b"half")
    (partial / "checkpoints" / "checkpoint-9").mkdir()
    (partial / "checkpoints" / "checkpoint-9" / "trainable.safetensors").write_bytes(b"half")

    summary = train.run(victim, resume=True)
    assert summary["steps"] == ref_summary["steps"] == 10
    assert summary["tokens_seen"] == ref_summary["tokens_seen"]
    assert summary["best_step"] == ref_summary["best_step"]
    _assert_same_run(ref.run_dir("train"), out)
    assert not (out / "checkpoints" / ".checkpoint-8.tmp").exists()  # cleaned up by the next save


def test_ctrl_c_saves_a_checkpoint_and_an_automatic_rerun_continues(tmp_path, tiny_model_dir):
    ref = prepared(tmp_path / "ref", tiny_model_dir, **SETTINGS)
    train.run(ref)

    run = prepared(tmp_path / "run", tiny_model_dir, **SETTINGS)

    def press_ctrl_c(step, val):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return False

    with pytest.raises(KeyboardInterrupt):
        train.run(run, on_eval=press_ctrl_c)
    out = run.run_dir("train")
    assert (run.run_dir() / ".train.partial" / "checkpoints" / "checkpoint-3" / "state.json").exists()
    assert not (out / "manifest.json").exists()
    summary = train.run(run)  # no --resume: an interrupted run with unchanged settings continues by itself
    assert summary["steps"] == 10
    _assert_same_run(ref.run_dir("train"), out)
