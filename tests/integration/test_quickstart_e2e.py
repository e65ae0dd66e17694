"""The whole pipeline, for real, through the CLI: `finetune run recipes/quickstart.yaml` on the embedded model with a
small budget (prepare -> train -> export -> eval), then checks every stage's manifest and key outputs (export's parity
figures on the real SmolLM2-135M-Instruct, where the thresholds mean something), runs again to see every stage
skipped, and serves the exported GGUF by its recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from finetune.run import artifacts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "quickstart.yaml"
BUDGET = ["train.max_steps=6", "train.eval_every=3", "train.save_every=3", "train.log_every=2", "eval.max_examples=8",
          "eval.max_new_tokens=48"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, finetune):
    # FINETUNE_E2E_RUNS_DIR reuses a runs folder (stages already up to date are skipped, the checks still run);
    # by default every stage runs from scratch in a fresh folder.
    runs_dir = Path(os.environ.get("FINETUNE_E2E_RUNS_DIR") or tmp_path_factory.mktemp("e2e-runs"))
    proc = finetune("run", str(RECIPE), f"runs_dir={runs_dir}", *BUDGET)
    assert proc.returncode == 0, f"finetune run failed:\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return runs_dir / "quickstart", proc.stdout, runs_dir


def manifest(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "manifest.json"
    assert path.exists(), f"{stage} wrote no manifest"
    data = json.loads(path.read_text())
    assert data["stage"] == stage and data["recipe"]["name"] == "quickstart"
    assert data["versions"]["llama-cpp-python"] and data["versions"]["torch"]
    return data


def test_prepare_outputs(run):
    run_dir, _, _ = run
    manifest(run_dir, "prepare")
    out = artifacts.from_folder(artifacts.Prepared, run_dir / "prepare")
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in out.splits[split].read_text().splitlines()]
        assert rows and len(rows) == out.rows[split]
        assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
        assert out.tokenized[split].is_dir()
    assert out.rows["train"] > out.rows["test"] > 0


def test_train_outputs(run, embedded_model):
    run_dir, _, _ = run
    manifest(run_dir, "train")
    out = artifacts.from_folder(artifacts.Trained, run_dir / "train")
    assert out.method == "lora" and out.model is None
    adapter = out.adapter
    assert (adapter / "adapter_config.json").exists()
    assert any(adapter.glob("adapter_model.safetensors"))
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_seen"] > 0
    assert summary["final_train_loss"] is not None and 0 < summary["final_train_loss"] < 20
    log = [json.loads(line) for line in (run_dir / "train" / "log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == 6
    # the skill is new to the model: the training loss drops fast, and the validation loss with it
    losses = [x["loss"] for x in log if x["loss"] is not None]
    vals = [x["val_loss"] for x in log if x["val_loss"] is not None]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8, losses
    assert len(vals) == 2 and vals[1] < vals[0], vals
    assert summary["base_dtype"] in ("bfloat16", "float32") and summary["trainable_dtype"] == "float32"
    assert summary["attn_implementation"] == "finetune_varlen" and summary["tokens_per_s"] > 0
    assert out.base_model == embedded_model.path  # the embedded model, converted once into the cache


def test_eval_outputs(run):
    run_dir, stdout, _ = run
    manifest(run_dir, "eval")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    assert metrics["examples"] == 8
    for model in (base, tuned):
        assert 0 < model["loss"] < 20 and model["perplexity"] > 1
    # Six steps at lr 5e-4 on this task lower the held-out loss (the signal the whole pipeline exists for).
    assert tuned["loss"] < base["loss"]
    # the forgetting check is on by default: measured, with a verdict (the other end-to-end tests switch it off)
    assert metrics["forgetting"] and metrics["verdict"]["forgetting"]["status"] in ("none", "mild", "strong")
    # export ran before eval, so the report scores the exported GGUF on the same prompts
    assert metrics["gguf"]["status"] == "scored", metrics["gguf"]
    page = (run_dir / "eval" / "report.html").read_text()
    assert "Which GGUF to ship" in page and "Q4_K_M" in page  # export's quantization table, shown in the report
    assert "base" in stdout and "fine-tuned" in stdout  # the score table printed at the end


def test_export_outputs(run):
    run_dir, _, _ = run
    manifest(run_dir, "export")
    out = artifacts.from_folder(artifacts.Exported, run_dir / "export")
    ggufs = out.gguf
    assert {"F16", "Q8_0", "Q4_K_M"} <= set(ggufs)
    for path in ggufs.values():
        assert path.exists() and path.read_bytes()[:4] == b"GGUF"
    assert ggufs["Q4_K_M"].stat().st_size < ggufs["Q8_0"].stat().st_size < ggufs["F16"].stat().st_size
    parity = json.loads(out.parity.read_text())
    assert parity["ok"], parity["failed"]
    assert parity["tokenization"]["ok"] and parity["chat_prompt"]["ok"]
    # a real instruct model, so the figures are the ones a user sees: F16 agrees with the HF model, and quantization
    # costs a small model more the fewer the bits
    f16, q8, q4 = (parity["types"][t]["logits"] for t in ("F16", "Q8_0", "Q4_K_M"))
    assert f16["top1_agreement"] >= 0.99 and f16["kl_mean"] < 1e-3
    assert f16["kl_mean"] < q8["kl_mean"] < q4["kl_mean"]
    assert q8["top1_agreement"] >= 0.80 and q4["top1_agreement"] >= 0.62
    assert parity["greedy_chat"]["gguf_stopped"] >= 1
    assert (out.merged / "config.json").exists()
    # Q4_K_M was quantized with an importance matrix from the training split, in llama.cpp's imatrix format
    assert out.imatrix.read_bytes()[:4] == b"GGUF"
    table = json.loads(out.quantization.read_text())
    rows = {r["type"]: r for r in table["rows"]}
    assert rows["Q4_K_M"]["imatrix"] and not rows["Q8_0"]["imatrix"]
    assert all(r["exact_match"] is not None and r["top1_agreement"] is not None for r in rows.values())
    # export.fit_gb: 0.2 picks a type that fits in 0.2 GB, and the Modelfile serves it
    assert out.picked in ("Q8_0", "Q4_K_M") and rows[out.picked]["bytes"] <= 0.2e9
    assert f"quickstart-{out.picked}.gguf" in (run_dir / "export" / "Modelfile").read_text()


def test_run_ends_with_an_answer_and_the_chat_command(run):
    run_dir, stdout, runs_dir = run
    assert "answer:" in stdout and "prompt:" in stdout
    assert f"finetune chat {RECIPE} runs_dir={runs_dir}" in stdout
    reused = bool(os.environ.get("FINETUNE_E2E_RUNS_DIR"))
    for stage in ("prepare", "train", "eval", "export"):
        assert f"[{stage}] done in" in stdout or (reused and f"[{stage}] up to date" in stdout)
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert set(state) == {"prepare", "train", "eval", "export"}


def test_second_run_skips_every_stage(run, finetune):
    _, _, runs_dir = run
    proc = finetune("run", str(RECIPE), f"runs_dir={runs_dir}", *BUDGET, "--no-answer", timeout=300)
    assert proc.returncode == 0, proc.stderr
    for stage in ("prepare", "train", "eval", "export"):
        assert f"[{stage}] up to date, skipped" in proc.stdout


def test_serve_the_recipe(run):
    openai = pytest.importorskip("openai")
    from serve.launch import ServerProcess

    run_dir, _, runs_dir = run
    # the type export picked for export.fit_gb: the one the Modelfile, eval's GGUF column and serve all use
    served = artifacts.from_folder(artifacts.Exported, run_dir / "export").gguf_to_serve()
    with ServerProcess(RECIPE, [f"runs_dir={runs_dir}", "serve.threads=1"]) as server:
        health = server.health()
        assert health["model"] == f"quickstart-{served}" and health["gguf"].endswith(f"quickstart-{served}.gguf")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=f"quickstart-{served}", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "Hello"}])
        assert isinstance(r.choices[0].message.content, str)
    assert (run_dir / "serve" / "feedback.sqlite3").exists()
