"""Model cards (finetune.card): parsed back with huggingface_hub's own ModelCard, base_model the Hub id (never a
local cache path), eval scores as model-index, and the adapter still loading after its config names the Hub id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from finetune import card
from finetune import recipe as recipe_mod
from finetune.run import artifacts

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _recipe(tmp_path, model_id=HUB_ID, **data):
    return recipe_mod.validate_dict({
        "name": "tickets", "runs_dir": str(tmp_path / "runs"), "model": {"id": model_id},
        "data": {"sources": [{"hub": "org/tickets"}, {"path": "mine.jsonl"}], **data},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16}}}, base_dir=tmp_path)


def _snapshot(tmp_path, tiny_model_dir) -> Path:
    """The base as the Hub cache holds it: .../models--org--name/snapshots/<commit>/."""
    import shutil

    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    shutil.copytree(tiny_model_dir, snap)
    return snap


@pytest.fixture
def adapter(tmp_path, tiny_model_dir):
    """A real peft adapter saved over the tiny model from a Hub-cache-like folder (peft writes its template card
    and the local path as base_model_name_or_path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _snapshot(tmp_path, tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return base, out


def test_the_adapter_card_names_the_hub_id_and_the_adapter_still_loads(tmp_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, out = adapter
    recipe = _recipe(tmp_path, system_prompt="Summarize the ticket as JSON.")
    summary = {"steps": 50, "stop_reason": "completed", "tokens_seen": 61000, "final_train_loss": 0.05,
               "final_val_loss": 0.034}
    card.write_training_card(out, recipe, summary, base)
    parsed = ModelCard.load(out / "README.md")
    assert parsed.data.base_model == HUB_ID and parsed.data.library_name == "peft"
    assert parsed.data.base_model_revision == "0123abc" and parsed.data.datasets == ["org/tickets"]
    assert {"finetune", "lora"} <= set(parsed.data.tags) and parsed.data.pipeline_tag == "text-generation"
    assert "[More Information Needed]" not in parsed.text and str(tmp_path) not in parsed.content
    assert "Summarize the ticket as JSON." in parsed.text and "steps: 50" in parsed.text
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == "0123abc"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)  # export and eval load it this way


def test_a_local_base_model_has_no_hub_id(tmp_path, adapter):
    base, out = adapter
    recipe = _recipe(tmp_path, model_id=str(base))
    card.write_training_card(out, recipe, None, base)
    parsed = ModelCard.load(out / "README.md")
    assert parsed.data.base_model is None and "(local)" in parsed.text
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)


def test_the_embedded_model_is_named_by_its_hub_id_and_license(tmp_path):
    base = card.base_of(_recipe(tmp_path, model_id="smollm2-135m-instruct"))
    assert (base.hub_id, base.license) == (HUB_ID, "apache-2.0")


def _export_inputs(tmp_path, tiny_model_dir):
    base = _snapshot(tmp_path, tiny_model_dir)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"steps": 50, "stop_reason": "completed", "tokens_seen": 61000,
                                   "final_train_loss": 0.05, "final_val_loss": 0.034}))
    trained = artifacts.Trained(method="lora", adapter=tmp_path / "adapter", base_model=base, log=tmp_path / "log",
                                summary=summary, tensorboard=tmp_path / "tb")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "system", "content": "Summarize the ticket as JSON."},
                                              {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                     + "\n")
    prepared = artifacts.Prepared(splits={"train": train}, tokenized={}, rows={"train": 400, "test": 60},
                                  report=tmp_path / "r", lengths_png=tmp_path / "l")
    return trained, prepared


PARITY = {"ok": True, "tokenization_exact": True, "chat_prompt_exact": True,
          "Q8_0": {"top1_agreement": 0.998, "kl_mean": 0.0004, "ppl_gguf": 1.5, "ppl_reference": 1.49}}


def test_the_export_card_before_and_after_eval(tmp_path, tiny_model_dir):
    from eval_fixtures import result_and_examples

    recipe = _recipe(tmp_path)
    trained, prepared = _export_inputs(tmp_path, tiny_model_dir)
    exported = tmp_path / "export"
    exported.mkdir()
    (exported / "README.md").write_text("# tickets: exported model\n\n| file | type |\n\n## Ollama\n\nollama create\n")
    export_card = card.export_card(recipe, trained, prepared, body=(exported / "README.md").read_text(),
                                   served="Q4_K_M", parity=PARITY)
    export_card.save(exported / "README.md")
    parsed = ModelCard.load(exported / "README.md")
    assert parsed.data.base_model == HUB_ID and parsed.data.library_name == "gguf" and "gguf" in parsed.data.tags
    assert not parsed.data.eval_results and "Not evaluated yet" in parsed.text
    assert "400 train rows, 60 test rows" in parsed.text and "Summarize the ticket as JSON." in parsed.text
    assert "| Q8_0 | 0.998 |" in parsed.text and "## Ollama" in parsed.text
    assert "llama-cli -m tickets-Q4_K_M.gguf" in parsed.text and "finetune chat" in parsed.text

    metrics, _, _ = result_and_examples()
    with_scores = card.with_eval(recipe, exported, metrics)
    with_scores.save(tmp_path / "scored.md")
    parsed = ModelCard.load(tmp_path / "scored.md")
    scores = {r.metric_type: r.metric_value for r in parsed.data.eval_results}
    assert scores["exact_match"] == pytest.approx(metrics["models"]["finetuned"]["exact_match"], abs=1e-4)
    assert parsed.data.model_name == "tickets" and "Not evaluated yet" not in parsed.text
    assert "| metric | base | finetuned | gguf-Q8_0 |" in parsed.text and "## Ollama" in parsed.text


def test_the_merged_card_is_a_transformers_model(tmp_path, tiny_model_dir):
    trained, prepared = _export_inputs(tmp_path, tiny_model_dir)
    merged = card.merged_card(_recipe(tmp_path), trained, prepared)
    assert merged.data.library_name == "transformers" and merged.data.base_model == HUB_ID
    assert "pipeline(" in merged.text
