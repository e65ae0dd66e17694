"""GRPO across processes and interruptions, on the tiny model: 2 CPU processes (torchrun, gloo) give the run of 1
process accumulating 2 (the same rollouts, rewards, losses and adapter: a completion's sampling depends on its
prompt's row and the step, never on the process), and a GRPO run killed mid-run and resumed ends as an
uninterrupted one. The GRPO maths against TRL and a resume after a stop: tests/unit/test_train_grpo.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_fixtures import record_prepared

from finetune import recipe as recipe_mod
from finetune import train

REWARDS = [{"name": "regex", "pattern": r".*[A-Z].*"}, {"name": "length", "max_tokens": 3, "weight": 0.5}]


def _rows(n: int, seed: int) -> dict[str, list]:
    """A random prompt ending with the chat template's assistant header, and a short reference."""
    rng = random.Random(seed)
    cols: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for _ in range(n):
        prompt = [1] + [rng.randint(10, 400) for _ in range(rng.randint(3, 10))] + [1, 520, 198]
        answer = [rng.randint(30, 40), 2]
        cols["input_ids"].append(prompt + answer)
        cols["labels"].append([-100] * len(prompt) + answer)
        cols["length"].append(len(prompt) + len(answer))
    return cols


def _prepared(tmp: Path, model_dir: Path, name: str, *, n_train: int = 8, n_val: int = 4, **train_settings):
    from datasets import Dataset

    settings = {"objective": "grpo", "rewards": REWARDS, **train_settings}
    data = {"name": name, "seed": 42, "runs_dir": str(tmp / "runs"),
            "model": {"id": str(model_dir), "dtype": "float32"}, "train": settings}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(data))
    recipe = recipe_mod.load(tmp / f"{name}.yaml")
    tokenized = recipe.run_dir("prepare") / "tokenized"
    for split, n, s in (("train", n_train, 0), ("validation", n_val, 1)):
        Dataset.from_dict(_rows(n, s)).save_to_disk(str(tokenized / split))
    record_prepared(recipe, {s: tokenized / s for s in ("train", "validation")},
                    {"train": n_train, "validation": n_val})
    return recipe


def _log(out: Path) -> tuple[list[dict], list[dict]]:
    """(training entries, validation entries) of a run's log.jsonl."""
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in log if e["loss"] is not None], [e for e in log if e["val_loss"] is not None]


def _adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(want_out: Path, got_out: Path, abs_tol: float) -> None:
    import torch

    (want, want_val), (got, got_val) = _log(want_out), _log(got_out)
    assert [e["step"] for e in got] == [e["step"] for e in want] and len(want) >= 2
    for key in ("reward", "reward_std", "reward/regex", "reward/length", "completion_length", "loss"):
        assert [e[key] for e in got] == pytest.approx([e[key] for e in want], abs=abs_tol), key
    assert [e["step"] for e in got_val] == [e["step"] for e in want_val] and want_val
    assert [e["val_reward"] for e in got_val] == pytest.approx([e["val_reward"] for e in want_val], abs=abs_tol)
    a, b = _adapter(want_out), _adapter(got_out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=abs_tol, rtol=1e-2)


# 2 prompts per micro-batch x 4 completions, 3 steps over 6 prompts: step 2 is the last of the epoch and has one
# micro-batch, so one process has none of its own. The batch's reward std scales the advantages (a figure of the
# whole step, over both processes); lr high enough that the adapter moves.
COMMON = dict(max_steps=3, batch_size=2, threads=1, lr=2e-2, scheduler="constant", warmup_ratio=0.0, log_every=1,
              eval_every=3, save_every=100,
              grpo={"generations": 4, "max_new_tokens": 6, "eval_examples": 4, "beta": 0.05, "scale_rewards": "batch"})


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path, tiny_model_dir, repo_root):
    single = _prepared(tmp_path, tiny_model_dir, "single", n_train=6, grad_accum=2, **COMMON)
    ddp = _prepared(tmp_path, tiny_model_dir, "ddp", n_train=6, grad_accum=1, **COMMON)
    train.run(single)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "finetune", "train",
                           str(tmp_path / "ddp.yaml")], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = single.run_dir("train"), ddp.run_dir("train")
    summary = json.loads((b / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert summary["tokens_seen"] == json.loads((a / "summary.json").read_text())["tokens_seen"]
    _assert_same_run(a, b, abs_tol=2e-3)
    # and it really trained: the adapter moved away from its zero-initialised B matrices
    assert any(float(w.abs().max()) > 1e-3 for n, w in _adapter(b).items() if "lora_B" in n)


# dropout on and two updates per batch of rollouts: the resumed run matches only if the random number generators,
# the optimizer and the schedule (steps x iterations) are restored too
RESUMED = dict(max_steps=4, batch_size=2, grad_accum=2, threads=1, lr=2e-2, scheduler="linear", warmup_ratio=0.0,
               log_every=1, eval_every=3, save_every=2, keep_checkpoints=2, lora={"r": 8, "alpha": 16, "dropout": 0.1},
               grpo={"generations": 4, "max_new_tokens": 6, "eval_examples": 4, "beta": 0.05, "iterations": 2})


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, repo_root):
    ref = _prepared(tmp_path / "ref", tiny_model_dir, "g", **RESUMED)
    ref_summary = train.run(ref)

    victim = _prepared(tmp_path / "victim", tiny_model_dir, "g", **RESUMED)
    # a real process, really killed from inside training at step 3 (checkpoint-2 written, the next one not yet)
    script = (
        "import os, signal\n"
        "from finetune import recipe, train\n"
        f"r = recipe.load({str(tmp_path / 'victim' / 'g.yaml')!r})\n"
        "def on_eval(step, val):\n"
        "    if step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return False\n"
        "train.run(r, on_eval=on_eval)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = victim.run_dir() / ".train.partial"
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["checkpoint-2"]

    summary = train.run(victim)  # an interrupted run with unchanged settings continues by itself
    assert summary["steps"] == ref_summary["steps"] == 4
    assert summary["tokens_seen"] == ref_summary["tokens_seen"]
    _assert_same_run(ref.run_dir("train"), victim.run_dir("train"), abs_tol=1e-4)
