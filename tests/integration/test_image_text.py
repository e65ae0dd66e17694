"""Text-only fine-tuning of image-text checkpoints, end to end: tiny Qwen3_5ForConditionalGeneration,
Gemma4ForConditionalGeneration and Mistral3ForConditionalGeneration (the primed twins of the family matrix wrapped in
their image-text class with a tiny vision tower, scripts/twins_vl.py) through validate, plan, prepare, train (LoRA),
export (F16 + Q8_0 + the adapter GGUF where llama.cpp can write one, parity) and serve (the openai client), with the
family matrix's own stages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import family_matrix as fm  # noqa: E402
import twins  # noqa: E402
import twins_vl  # noqa: E402


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module", params=sorted(twins_vl.IMAGE_TEXT))
def pipeline(request, tmp_path_factory):
    """The image-text twin through every stage; {"twin", "family", "recipe", "cells"} (a stage's failure stops the
    rest)."""
    from transformers import AutoTokenizer

    from finetune import recipe as recipe_mod

    name = twins_vl.IMAGE_TEXT[request.param].text_family
    primed = fm.prime(name, twins.build(name))
    twin = twins_vl.build(request.param, primed["path"])
    work = tmp_path_factory.mktemp(f"image-text-{request.param}")
    recipe_path = fm.write_recipe(name, twin, work, fm.supports_system(AutoTokenizer.from_pretrained(twin)))
    checks = {"validate": _cli("validate", str(recipe_path)), "plan": _cli("plan", str(recipe_path))}
    recipe = recipe_mod.load(recipe_path)
    family = twins.FAMILIES[name]
    stages = [("prepare", lambda: fm.stage_prepare(recipe)), ("train", lambda: fm.stage_train(recipe)),
              ("export", lambda: fm.stage_export(recipe, family)), ("serve", lambda: fm.stage_serve(recipe_path, recipe)),
              ("ollama", lambda: fm.stage_ollama(recipe, family))]
    cells = {}
    for name, stage in stages:
        cells[name] = stage()
        if not cells[name]["ok"]:
            break
    return {"twin": twin, "family": family, "recipe": recipe, "cells": cells, "checks": checks}


def test_validate_and_plan_accept_it(pipeline):
    for name, proc in pipeline["checks"].items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def test_every_stage_passes(pipeline):
    cells = pipeline["cells"]
    failed = {stage: cell.get("error") for stage, cell in cells.items() if not cell["ok"]}
    assert not failed and len(cells) == 5, json.dumps(failed, indent=1)[:3000]
    assert cells["train"]["loss_last"] < cells["train"]["loss_first"]
    ex = cells["export"]
    assert ex["tokenization"] and ex["chat_prompt"] and ex["stopped"]
    assert ex["end_of_turn"] == pipeline["family"].end_of_turn
    if fm.adapter_refusal(pipeline["family"]) is None:  # the adapter GGUF was written and checked over the base GGUF
        assert ex["adapter_top1"] is not None
    assert cells["serve"]["finish_reason"] == "stop"


def test_merged_checkpoint_is_the_image_text_model_with_its_vision_tower_unchanged(pipeline):
    import torch
    from safetensors import safe_open

    merged = Path(pipeline["cells"]["export"]["gguf"]["F16"]).parent / "merged"
    config = json.loads((merged / "config.json").read_text())
    base = json.loads((pipeline["twin"] / "config.json").read_text())
    assert config["architectures"] == base["architectures"] and "vision_config" in config
    with safe_open(str(pipeline["twin"] / "model.safetensors"), "pt") as b, \
            safe_open(str(merged / "model.safetensors"), "pt") as m:
        assert set(b.keys()) == set(m.keys())
        vision = [k for k in b.keys() if not k.startswith(("model.language_model.", "language_model."))]
        assert vision
        for k in vision:
            assert torch.equal(b.get_tensor(k).view(torch.uint8), m.get_tensor(k).view(torch.uint8)), k
    readme = (merged.parent / "README.md").read_text()
    assert "text-only fine-tune" in readme and "no mmproj" in readme


def test_the_gguf_is_the_text_model_only(pipeline):
    from finetune.gguf import sdist

    sys.path.insert(0, str(sdist.llama_cpp_dir() / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(pipeline["cells"]["export"]["gguf"]["F16"])
    names = [t.name for t in reader.tensors]
    assert any(n.startswith("blk.") for n in names)
    assert not [n for n in names if n.startswith(("v.", "mm."))], "vision tensors in the text GGUF"
