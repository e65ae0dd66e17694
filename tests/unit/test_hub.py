"""`finetune push`: the upload plan per --what (from the records train, export and eval wrote), and its failures
as one line with exit 2, with huggingface_hub's own refusals (no token, HF_HUB_OFFLINE=1, an endpoint that does
not answer). No Hub is reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import hub
from finetune import recipe as recipe_mod
from finetune.run import artifacts
from finetune.run.runs import StageRun


@pytest.fixture
def pushed_run(tmp_path, tiny_model_dir):
    """A recipe file whose train and export stages finished (small stand-in files: push reads none of them)."""
    recipe_file = tmp_path / "demo.yaml"
    recipe_file.write_text(f"name: demo\nruns_dir: {tmp_path / 'runs'}\nmodel: {{id: {tiny_model_dir}}}\n"
                           "data: {sources: [{path: mine.jsonl}]}\nexport: {quantizations: [Q4_K_M]}\n")
    recipe = recipe_mod.load(recipe_file)
    with StageRun(recipe, "train") as stage:
        adapter = stage.dir / "adapter"
        adapter.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"):
            (adapter / name).write_text("{}")
        stage.record(artifacts.Trained(method="lora", adapter=adapter, base_model=tiny_model_dir,
                                       log=stage.dir / "log.jsonl", summary=stage.dir / "summary.json",
                                       tensorboard=stage.dir / "tb"))
    with StageRun(recipe, "export") as stage:
        out = stage.dir
        (out / "merged").mkdir(parents=True)
        for name in ("merged/config.json", "merged/model.safetensors", "merged/README.md", "demo-F16.gguf",
                     "demo-Q4_K_M.gguf", "demo-adapter-F16.gguf", "demo-base-F16.gguf", "demo-imatrix.gguf",
                     "demo-F16.Modelfile", "demo-Q4_K_M.Modelfile", "Modelfile", "parity.json",
                     "quantization.json"):
            (out / name).write_text("x")
        (out / "README.md").write_text("---\nlibrary_name: gguf\n---\n\n# demo\n\n## Evaluation\n\nNot evaluated yet.\n"
                                       "\n## Ollama\n")
        stage.record(artifacts.Exported(merged=out / "merged", gguf={"F16": out / "demo-F16.gguf",
                                                                     "Q4_K_M": out / "demo-Q4_K_M.gguf"},
                                        adapter_gguf=out / "demo-adapter-F16.gguf",
                                        base_gguf=out / "demo-base-F16.gguf", parity=out / "parity.json",
                                        quantization=out / "quantization.json", imatrix=out / "demo-imatrix.gguf",
                                        picked="Q4_K_M"))
    return recipe_file, recipe


def _paths(uploads):
    return sorted(u.path_in_repo for u in uploads)


def test_the_upload_plan_per_what(pushed_run):
    _, recipe = pushed_run
    assert _paths(hub.plan(recipe, "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                   "tokenizer.json"]
    assert _paths(hub.plan(recipe, "merged")) == ["README.md", "config.json", "model.safetensors"]
    gguf = _paths(hub.plan(recipe, "gguf"))
    assert gguf == ["Modelfile", "README.md", "demo-F16.Modelfile", "demo-F16.gguf", "demo-Q4_K_M.Modelfile",
                    "demo-Q4_K_M.gguf", "demo-adapter-F16.gguf", "parity.json", "quantization.json"]
    assert "demo-base-F16.gguf" not in gguf and "demo-imatrix.gguf" not in gguf  # the base model and calibration
    everything = _paths(hub.plan(recipe, "all"))
    assert everything == sorted([*(f"adapter/{p}" for p in _paths(hub.plan(recipe, "adapter"))),
                                 *(f"merged/{p}" for p in _paths(hub.plan(recipe, "merged"))), *gguf])


def test_the_export_card_carries_eval_scores_once_eval_scored_this_export(pushed_run):
    from eval_fixtures import result_and_examples
    from huggingface_hub import ModelCard

    _, recipe = pushed_run
    readme = next(u for u in hub.plan(recipe, "gguf") if u.path_in_repo == "README.md")
    assert isinstance(readme.source, Path)  # no eval yet: the card as export wrote it
    exported = artifacts.load(recipe, artifacts.Exported, fresh=False)
    metrics, _, _ = result_and_examples()
    with StageRun(recipe, "eval", upstream={"export": exported.manifest_id}) as stage:
        (stage.dir / "metrics.json").write_text(json.dumps(metrics))
        stage.record(artifacts.Evaluated(metrics=stage.dir / "metrics.json", examples=stage.dir / "e.jsonl",
                                         report=stage.dir / "report.html", variants=list(metrics["models"])))
    readme = next(u for u in hub.plan(recipe, "gguf") if u.path_in_repo == "README.md")
    card = ModelCard(readme.source.decode())
    assert {r.metric_type for r in card.data.eval_results} >= {"exact_match", "bleu"}
    assert "| metric | base | finetuned | gguf-Q8_0 |" in card.text and "Not evaluated yet" not in card.text


def test_adapter_of_a_full_fine_tune_and_a_missing_export_are_named(tmp_path, tiny_model_dir):
    from finetune.errors import UserError

    recipe = recipe_mod.validate_dict({"name": "full", "runs_dir": str(tmp_path), "model": {"id": str(tiny_model_dir)},
                                       "train": {"method": "full"}})
    with StageRun(recipe, "train") as stage:
        stage.record(artifacts.Trained(method="full", model=stage.dir / "model", base_model=tiny_model_dir,
                                       log=stage.dir / "l", summary=stage.dir / "s", tensorboard=stage.dir / "t"))
    with pytest.raises(UserError, match="has no adapter; push --what merged"):
        hub.plan(recipe, "adapter")
    with pytest.raises(UserError, match="finetune export"):
        hub.plan(recipe, "gguf")


def test_dry_run_lists_the_files_and_a_bad_repo_id_is_refused(pushed_run, cli):
    recipe_file, _ = pushed_run
    code, out, _ = cli("push", str(recipe_file), "--repo", "alice/demo", "--dry-run")
    assert code == 0 and "demo-Q4_K_M.gguf" in out and "would go to https://huggingface.co/alice/demo" in out
    code, _, err = cli("push", str(recipe_file), "--repo", "demo", "--dry-run")
    assert code == 2 and "give USER/NAME" in err


def _push(recipe_file: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a child process: huggingface_hub reads HF_HUB_OFFLINE and its token file at import."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    return subprocess.run([sys.executable, "-m", "finetune", "push", str(recipe_file), "--repo", "alice/demo"],
                          env=clean, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("env", "message"), [
    ({}, "no Hugging Face token found: run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"),
    ({"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}, "the Hub is switched off here (HF_HUB_OFFLINE=1)"),
    ({"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub ("),
])
def test_push_failures_are_one_line_and_exit_2(pushed_run, tmp_path, env, message):
    recipe_file, _ = pushed_run
    done = _push(recipe_file, tmp_path, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
