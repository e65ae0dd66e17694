"""A Qwen3.5 checkpoint whose config.json declares no multi-token-prediction layers trains and exports with parity.

transformers writes a Qwen3.5 config without MTP keys (its Qwen3_5TextConfig has no ``mtp_num_hidden_layers``), and
its weights never hold MTP tensors. llama.cpp's Qwen3.5 converter, told nothing, counts MTP layers from the tensors
and asserts that it found some: whether the converter is told "no MTP" must follow the weights, not the config.

The model is the family matrix's primed qwen3.5 twin (scripts/twins.py, scripts/family_matrix.py: built and primed
once, cached) saved again by transformers from a fresh config, and taken through prepare, train and export as the
matrix does.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import family_matrix  # noqa: E402
import twins  # noqa: E402

FAMILY = "qwen3.5"
MTP_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers", "mtp")


@pytest.fixture(scope="module")
def fresh_config_model(tmp_path_factory) -> Path:
    """The primed twin's weights under a config that transformers built from scratch: no MTP key, no MTP tensor."""
    import torch
    import transformers

    twin = family_matrix.prime(FAMILY, twins.build(FAMILY, log=lambda *_: None), log=lambda *_: None)["path"]
    saved = json.loads((twin / "config.json").read_text())
    assert saved.get("mtp_num_hidden_layers") == 1  # the twin declares one, as the published config.json files do
    family = twins.FAMILIES[FAMILY]
    cls = getattr(transformers, family.arch)
    settings = {k: v for k, v in {**twins.TINY, **family.config}.items() if k not in MTP_KEYS}
    config = cls.config_class(vocab_size=saved["vocab_size"], bos_token_id=saved.get("bos_token_id"),
                              eos_token_id=saved.get("eos_token_id"), pad_token_id=saved.get("pad_token_id"),
                              **settings)
    config.architectures = [family.arch]
    model = cls(config)
    model.load_state_dict(cls.from_pretrained(twin, dtype=torch.float32).state_dict())
    out = tmp_path_factory.mktemp("qwen35-fresh-config") / "qwen35-no-mtp"
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for f in twin.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "primed.json"):
            shutil.copyfile(f, out / f.name)
    return out


def _declares_mtp(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    return [k for c in (config, config.get("text_config") or {}) for k in c if "mtp" in k or "nextn" in k]


def test_a_qwen35_model_without_declared_mtp_trains_and_exports_with_parity(fresh_config_model, tmp_path):
    from safetensors import safe_open

    from finetune import recipe as recipe_mod
    from finetune.gguf import convert

    assert _declares_mtp(fresh_config_model) == []
    with safe_open(fresh_config_model / "model.safetensors", framework="np") as st:
        assert not [n for n in st.keys() if "mtp" in n]
    assert convert.missing_mtp_layers(fresh_config_model)  # the weights decide: no MTP tensors, so none converted

    from transformers import AutoTokenizer

    system_ok = family_matrix.supports_system(AutoTokenizer.from_pretrained(fresh_config_model))
    # the quantization table's greedy answers (24 prompts per type) prove nothing about MTP: left out for time
    recipe = recipe_mod.load(family_matrix.write_recipe(FAMILY, fresh_config_model, tmp_path, system_ok),
                             ["export.table_examples=0"])

    assert family_matrix.stage_prepare(recipe)["ok"]
    trained = family_matrix.stage_train(recipe)
    assert trained["ok"], trained
    exported = family_matrix.stage_export(recipe, twins.FAMILIES[FAMILY])
    assert exported["ok"], exported.get("error")
    assert exported["f16_top1"] >= 0.99 and exported["stopped"]
    assert _declares_mtp(recipe.run_dir("export") / "merged") == []
