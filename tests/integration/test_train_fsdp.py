"""Sharded training (FSDP2 through accelerate) on the CPU: 2 processes over gloo, launched with the shipped
recipes/accelerate/fsdp2*.yaml configs, give the same run as 1 process accumulating 2 (LoRA, full fine-tuning over
two "machines" on localhost, DPO with its adapter-disabled reference pass); a run whose main process is killed
mid-run, launched again, ends with the same adapter as an uninterrupted one; the finished adapter and model are
ordinary peft / Hugging Face folders. The refusals: tests/unit/test_train_parallel.py.

Tolerances: the two sides sum the same gradients in another order (reduce-scatter vs accumulation), so losses agree
to 2e-3 and weights to atol 2e-3 / rtol 2e-2 after a few AdamW steps at lr 1e-2, as in test_train_ddp.py."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import prepared, record_prepared, train_losses, val_losses

from finetune import train

pytestmark = pytest.mark.slow

LORA = dict(max_steps=8, batch_size=4, lr=1e-2, log_every=1, eval_every=3, save_every=4, keep_checkpoints=2,
            lora={"r": 8, "alpha": 16, "dropout": 0.0})


def _env(repo_root: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1"}


def _launch(repo_root: Path, config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(repo_root / "recipes" / "accelerate" / config), *args]


def _fsdp_train(repo_root: Path, recipe_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = _launch(repo_root, "fsdp2.yaml", "--num_processes", "2", "-m", "finetune", "train", str(recipe_path))
    return subprocess.run(cmd, cwd=repo_root, env=_env(repo_root), capture_output=True, text=True, timeout=timeout)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _assert_same_run(want_out: Path, got_out: Path, folder: str, *, atol: float = 2e-3) -> None:
    import torch

    for read in (train_losses, val_losses):
        got, want = read(got_out / "log.jsonl"), read(want_out / "log.jsonl")
        assert [s for s, _ in got] == [s for s, _ in want] and len(got) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=2e-3)
    want, got = _weights(want_out / folder), _weights(got_out / folder)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=2e-2)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, repo_root):
    """One process with grad_accum 2, and FSDP2 over 2 processes with grad_accum 1: (their train folders, tmp)."""
    tmp = tmp_path_factory.mktemp("fsdp-lora")
    single = prepared(tmp, tiny_model_dir, "single", grad_accum=2, **LORA)
    sharded = prepared(tmp, tiny_model_dir, "sharded", grad_accum=1, **LORA)
    train.run(single)
    proc = _fsdp_train(repo_root, tmp / "sharded.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 over 2 processes, one group per LlamaDecoderLayer" in proc.stderr
    return single.run_dir("train"), sharded.run_dir("train"), tmp


def test_fsdp2_lora_matches_one_process_with_accumulation(lora_runs, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    single, sharded, _ = lora_runs
    s = _summary(sharded)
    assert (s["processes"], s["sharding"], s["fsdp_wrapped_layers"], s["steps"]) == (2, "fsdp2", ["LlamaDecoderLayer"], 8)
    assert s["tokens_seen"] == _summary(single)["tokens_seen"]
    _assert_same_run(single, sharded, "adapter")
    adapter = _weights(sharded / "adapter")
    assert any(float(w.abs().max()) > 1e-3 for n, w in adapter.items() if "lora_B" in n)  # it trained
    # an ordinary peft adapter: loads over the base as export, eval and serve load it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sharded / "adapter").eval()
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain, atol=1e-4)


def test_fsdp2_adapter_exports_with_parity(lora_runs, tiny_model_dir):
    """export reads the FSDP2-trained adapter as any other: merged, converted to an F16 GGUF that llama.cpp answers
    with the merged model's top tokens, and an adapter GGUF over the base GGUF."""
    from finetune import export

    _, sharded, tmp = lora_runs
    result = export.export_model(name="fsdp", out_dir=tmp / "export", base_dir=tiny_model_dir,
                                 adapter_dir=sharded / "adapter", quantizations=[], ollama=False,
                                 table=export.TableSettings(examples=0), log=lambda *_: None)
    report = json.loads(Path(result["parity"]).read_text())
    assert report["ok"], report["failed"]
    assert report["types"]["F16"]["logits"]["top1_agreement"] == 1.0
    assert report["adapter"]["top1_agreement"] >= 0.97


def test_fsdp2_run_killed_mid_run_resumes_to_the_uninterrupted_weights(lora_runs, repo_root):
    """The main process SIGKILLs itself at step 6 (checkpoint-4 written, a sharded optimizer state gathered into
    it); the launcher takes the other process down; the same command again finishes the run."""
    _, uninterrupted, tmp = lora_runs
    victim_path = tmp / "victim.yaml"
    victim_path.write_text((tmp / "sharded.yaml").read_text().replace("name: sharded", "name: victim"))
    from finetune import recipe as recipe_mod

    victim = recipe_mod.load(victim_path)
    tokenized = {split: tmp / "runs" / "sharded" / "prepare" / "tokenized" / split for split in ("train", "validation")}
    record_prepared(victim, tokenized, {"train": 48, "validation": 12})
    script = tmp / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from finetune import recipe, train\n"
        "def on_eval(step, val):\n"
        "    if step == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return False\n"
        f"train.run(recipe.load({str(victim_path)!r}), on_eval=on_eval)\n")
    proc = subprocess.run(_launch(repo_root, "fsdp2.yaml", "--num_processes", "2", str(script)), cwd=repo_root,
                          env=_env(repo_root), capture_output=True, text=True, timeout=300)
    out = victim.run_dir("train")
    assert proc.returncode != 0 and not (out / "manifest.json").exists(), proc.stderr[-2000:]
    checkpoints = out.parent / ".train.partial" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]
    assert json.loads((checkpoints / "checkpoint-4" / "state.json").read_text())["processes"] == 2

    proc = _fsdp_train(repo_root, victim_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout + proc.stderr
    _assert_same_run(uninterrupted, out, "adapter", atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_full_fine_tuning_on_two_nodes_matches_one_process(tmp_path, tiny_model_dir, repo_root):
    """Two launchers on localhost, one process each (`--num_machines 2`, the multi-node config), full fine-tuning:
    the same model as 1 process with grad_accum 2, saved as an ordinary Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM

    common = dict(method="full", max_steps=4, batch_size=4, lr=1e-3, log_every=1, eval_every=2, save_every=100,
                  threads=1)
    single = prepared(tmp_path, tiny_model_dir, "single", grad_accum=2, **common)
    nodes = prepared(tmp_path, tiny_model_dir, "nodes", grad_accum=1, **common)
    train.run(single)
    port = str(_free_port())
    procs = [subprocess.Popen(_launch(repo_root, "fsdp2-multi-node.yaml", "--num_machines", "2", "--num_processes",
                                      "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                      "--main_process_port", port, "-m", "finetune", "train",
                                      str(tmp_path / "nodes.yaml")),
                              cwd=repo_root, env=_env(repo_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    out = nodes.run_dir("train")
    s = _summary(out)
    assert (s["processes"], s["sharding"], s["method"]) == (2, "fsdp2", "full")
    _assert_same_run(single.run_dir("train"), out, "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # what export and eval load
    assert sum(p.numel() for p in model.parameters()) == s["trainable_params"]


def _preference_rows(n: int, seed: int) -> dict[str, list]:
    """Pairs: a random prompt, the chosen answer a fixed run of tokens, the rejected answer random tokens."""
    rng = random.Random(seed)
    cols: dict[str, list] = {k: [] for k in ("input_ids", "labels", "rejected_input_ids", "rejected_labels",
                                             "prompt_length", "length")}
    for _ in range(n):
        prompt = [rng.randint(10, 400) for _ in range(rng.randint(3, 12))]
        good = [100 + j for j in range(rng.randint(2, 8))] + [2]
        bad = [rng.randint(500, 900) for _ in range(rng.randint(2, 8))] + [2]
        for prefix, answer in (("", good), ("rejected_", bad)):
            cols[prefix + "input_ids"].append(prompt + answer)
            cols[prefix + "labels"].append([-100] * len(prompt) + answer)
        cols["prompt_length"].append(len(prompt))
        cols["length"].append(len(prompt) + len(good))
    return cols


def _prepared_pairs(tmp: Path, model_dir: Path, name: str, **train_settings):
    import yaml
    from datasets import Dataset

    from finetune import recipe as recipe_mod

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "seed": 42, "runs_dir": str(tmp / "runs"),
                                    "model": {"id": str(model_dir), "dtype": "float32"}, "train": train_settings}))
    recipe = recipe_mod.load(path)
    tokenized = recipe.run_dir("prepare") / "tokenized"
    for split, n, seed in (("train", 32, 0), ("validation", 8, 1)):
        Dataset.from_dict(_preference_rows(n, seed)).save_to_disk(str(tokenized / split))
    record_prepared(recipe, {s: tokenized / s for s in ("train", "validation")}, {"train": 32, "validation": 8})
    return recipe


def test_fsdp2_dpo_with_the_adapter_disabled_reference_matches_one_process(tmp_path, tiny_model_dir, repo_root):
    common = dict(objective="dpo", max_steps=4, batch_size=4, lr=1e-2, log_every=1, eval_every=2, save_every=100)
    single = _prepared_pairs(tmp_path, tiny_model_dir, "single", grad_accum=2, **common)
    _prepared_pairs(tmp_path, tiny_model_dir, "sharded", grad_accum=1, **common)
    train.run(single)
    proc = _fsdp_train(repo_root, tmp_path / "sharded.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = single.run_dir("train"), tmp_path / "runs" / "sharded" / "train"
    first = [json.loads(x) for x in (got / "log.jsonl").read_text().splitlines()][0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)  # policy == reference at the first step
    _assert_same_run(want, got, "adapter")
    s, w = _summary(got), _summary(want)
    assert s["sharding"] == "fsdp2" and s["validation_reward"] == pytest.approx(w["validation_reward"], abs=2e-3)
