"""The train stage on the embedded SmolLM2-135M with the real quickstart data (prepared by the real prepare stage)."""

from __future__ import annotations

import json

import pytest

from finetune import artifacts

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_loss_falls_and_validation_is_recorded(tmp_path, repo_root, embedded_model):
    from finetune import prepare, train
    from finetune import recipe as recipe_mod

    recipe = recipe_mod.load(repo_root / "recipes" / "quickstart.yaml", [
        f"runs_dir={tmp_path / 'runs'}", "train.max_steps=8", "train.batch_size=8", "train.eval_every=4",
        "train.log_every=2", "train.save_every=100",
    ])
    prepare.run(recipe)
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["loss"] is not None]
    vals = [x["val_loss"] for x in lines if x["val_loss"] is not None]
    assert summary["steps"] == 8 and len(losses) == 4 and len(vals) == 2
    assert losses[-1] < losses[0] * 0.8, losses  # the skill is new to the model: loss drops fast
    assert vals[1] < vals[0], vals
    assert summary["base_dtype"] in ("bfloat16", "float32") and summary["trainable_dtype"] == "float32"
    assert summary["attn_implementation"] == "finetune_varlen" and summary["tokens_per_s"] > 0
    assert artifacts.from_folder(artifacts.Trained, out).base_model == embedded_model.path
    assert (out / "adapter" / "adapter_model.safetensors").exists()
