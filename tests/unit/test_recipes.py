"""Every shipped recipe: valid, documented (card, license gate), and planned to fit the card its header names.

The plan uses the config.json snapshots in tests/fixtures/configs/ (no network, no weights).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from finetune import plan, recipe

REPO = Path(__file__).resolve().parent.parent.parent
RECIPES = REPO / "recipes"
FIXTURES = REPO / "tests" / "fixtures" / "configs"
GATED_ORGS = ("meta-llama/", "google/gemma", "mistralai/")
UNGATED = ("google/gemma-4",)  # Gemma 4 is Apache-2.0 and its repositories are not gated


def shipped() -> list[Path]:
    return recipe.recipe_files(RECIPES)


def sized() -> list[Path]:
    """The recipes this suite checks against a card: everything except the quickstart (sized for a CPU)."""
    return [p for p in shipped() if p.name != "quickstart.yaml"]


def fixture_for(model_id: str) -> Path | None:
    if "/" not in model_id:
        return None  # the embedded model: its real config is read from the converted checkpoint
    return FIXTURES / f"{model_id.replace('/', '--')}.json"


def test_every_shipped_recipe_passes_validate_with_its_data(cli):
    """`finetune validate recipes/` checks more than the schema: the local data files, their format and mapped
    columns, local model paths. Every shipped recipe passes."""
    code, out, err = cli("validate", str(RECIPES))
    assert code == 0, err
    assert f"{len(shipped())} valid, 0 invalid" in out


def test_recipes_are_organised_and_cover_the_models_people_use():
    names = {p.relative_to(RECIPES).as_posix() for p in shipped()}
    assert any(n.startswith("models/") for n in names) and any(n.startswith("tasks/") for n in names)
    ids = {recipe.load(p).model.id for p in shipped()}
    for wanted in ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
                   "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                   "Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", "mistralai/Mistral-7B-Instruct-v0.3", "google/gemma-2-2b-it",
                   "microsoft/Phi-3.5-mini-instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
                   "HuggingFaceTB/SmolLM3-3B"):
        assert wanted in ids, wanted
    cards = {recipe.load(p).card_gb for p in sized()}
    assert {8, 12, 16, 24} <= cards


@pytest.mark.parametrize("path", sized(), ids=lambda p: p.stem)
def test_header_names_model_card_and_license(path):
    text = path.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    r = recipe.load(path)
    assert r.card_gb is not None, "every shipped recipe names the card it is sized for (card_gb:)"
    assert f"card_gb {r.card_gb}" in header, "the header comment names the card size"
    assert r.model.id in header or r.model.id == "smollm2-135m-instruct"
    assert "License" in header or r.model.id == "smollm2-135m-instruct"
    assert "Revision" in header or r.model.id == "smollm2-135m-instruct"  # pinned, or says why not
    gated = r.model.id.startswith(GATED_ORGS) and not r.model.id.startswith(UNGATED)
    assert r.model.gated == gated, f"{r.model.id}: model.gated must be {gated}"
    if gated:
        assert "GATED" in header and "hf auth login" in header


@pytest.mark.parametrize("path", sized(), ids=lambda p: p.stem)
def test_plan_fits_the_card_in_the_header(path, tmp_path):
    r = recipe.load(path, [f"runs_dir={tmp_path}"])  # the worst case from the recipe, not a local prepare run
    fixture = fixture_for(r.model.id)
    if fixture is not None:
        assert fixture.exists(), f"add a config.json snapshot of {r.model.id} as {fixture.relative_to(REPO)}"
    result = plan.run(r, gpu_gb=r.card_gb, config_path=fixture)
    target = result["results"][0]
    assert target["fits"], f"{path.name}: does not fit {r.card_gb} GB:\n{plan.format_plan(result)}"
    assert target["estimate"]["total"] > 0.3 * target["budget"] or r.model.id == "smollm2-135m-instruct", \
        "far below the card: raise the batch or sequence length, or name a smaller card"
    t = result["time_estimate"]
    assert t["seconds_per_1k_examples"] > 0 and "estimate" in t["label"]


def test_task_recipes_use_hub_datasets_and_the_metrics_their_task_needs():
    tasks = {p.stem: recipe.load(p) for p in (RECIPES / "tasks").glob("*.yaml")}
    assert any(s.hub for s in tasks["alpaca-instruct"].data.sources)
    assert tasks["alpaca-instruct"].data.sources[0].format == "alpaca"
    chat = tasks["ultrachat-chat"]
    assert chat.data.sources[0].hub and chat.data.sources[0].format == "messages"
    cls = tasks["classify-news"]
    assert {"accuracy", "f1"} <= set(cls.eval.metrics)
    assert cls.data.sources[0].columns == {"prompt": "text", "completion": "label_text"}


def test_own_data_template_points_at_a_shipped_file_with_the_mapped_columns():
    r = recipe.load(RECIPES / "tasks" / "my-data.yaml")
    src = r.data.sources[0]
    path = r.resolve_path(src.path)
    assert path.is_file(), path
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 30
    assert set(src.columns.values()) <= set(rows[0]), "columns: must name columns of the example file"
    assert all(row[c].strip() for row in rows for c in src.columns.values())


def test_own_data_template_prepares_offline(tmp_path, embedded_model):
    """The newcomer's template runs as shipped: prepare reads the CSV, renders it and writes the splits."""
    from finetune import prepare

    r = recipe.load(RECIPES / "tasks" / "my-data.yaml", [f"runs_dir={tmp_path / 'runs'}"])
    report = prepare.run(r)
    manifest = r.run_dir("prepare") / "manifest.json"
    assert manifest.exists()
    rows = report["splits"]
    assert rows["train"] >= 20 and rows["validation"] >= 1 and rows["test"] >= 1, rows
    first = (r.run_dir("prepare") / "splits" / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert '"role": "assistant"' in first and "Answer briefly and exactly." in first

    # after prepare, the plan sizes for the longest real example and the measured share of trained positions
    from datasets import load_from_disk

    ds = load_from_disk(str(r.run_dir("prepare") / "tokenized" / "train"))
    result = plan.run(r, gpu_gb=8)
    settings = result["results"][0]["settings"]
    assert settings["seq_len"] == max(ds["length"]) < r.data.clean.max_tokens
    assert 0 < settings["logit_fraction"] < 1
    assert result["time_estimate"]["tokens_per_example_source"] == "measured by prepare"
    assert result["time_estimate"]["tokens_per_example"] == pytest.approx(sum(ds["length"]) / len(ds))


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    """The accelerate configs shipped for multi-GPU and multi-machine runs load with accelerate and are
    data-parallel or FSDP2 (the distributed types `finetune train` accepts)."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    assert kind in ("MULTI_GPU", "FSDP")
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2 and path.name.startswith("fsdp2")
    assert str(getattr(config.mixed_precision, "value", config.mixed_precision)) == "no"
    assert config.num_processes >= 2 and config.use_cpu is False
