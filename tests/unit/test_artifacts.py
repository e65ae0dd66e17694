"""The typed hand-offs between stages (finetune.run.artifacts): round trips, relative paths, refusals, and that no
module reads another stage's manifest except through them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.run import artifacts, runs


def trained(root: Path, base: Path) -> artifacts.Trained:
    return artifacts.Trained(method="lora", adapter=root / "train" / "adapter", model=None, base_model=base,
                             log=root / "train" / "log.jsonl", summary=root / "train" / "summary.json",
                             tensorboard=root / "train" / "tb")


def test_paths_inside_the_run_folder_are_stored_relative_and_read_back_absolute(tmp_path):
    root, base = tmp_path / "runs" / "demo", tmp_path / "cache" / "base-model"
    outputs = artifacts.to_outputs(trained(root, base), root)
    assert outputs["adapter"] == "train/adapter" and outputs["model"] is None
    assert outputs["base_model"] == str(base)  # outside the run folder: kept as it is
    json.dumps(outputs)  # a manifest is JSON
    moved = tmp_path / "elsewhere" / "demo"
    back = artifacts.from_outputs(artifacts.Trained, outputs, moved, manifest_id="abc")
    assert back.adapter == moved / "train" / "adapter" and back.base_model == base
    assert back.weights == back.adapter and back.manifest_id == "abc"
    assert back == artifacts.from_outputs(artifacts.Trained, outputs, moved)  # the id is not part of equality


def test_a_dict_of_paths_round_trips(tmp_path):
    rec = artifacts.Exported(merged=tmp_path / "export" / "merged",
                             gguf={"F16": tmp_path / "export" / "a-F16.gguf", "Q8_0": tmp_path / "export" / "a.gguf"},
                             picked="Q8_0")
    outputs = artifacts.to_outputs(rec, tmp_path)
    assert outputs["gguf"] == {"F16": "export/a-F16.gguf", "Q8_0": "export/a.gguf"}
    assert artifacts.from_outputs(artifacts.Exported, outputs, tmp_path) == rec


def test_an_older_manifest_missing_a_key_is_refused_with_the_stage_to_rerun(tmp_path):
    outputs = artifacts.to_outputs(trained(tmp_path, tmp_path / "base"), tmp_path)
    del outputs["log"]
    with pytest.raises(UserError, match=r"m\.json: the train outputs lack 'log'.*run `finetune train RECIPE` again"):
        artifacts.from_outputs(artifacts.Trained, outputs, tmp_path, where="m.json")


def test_from_folder_reads_a_finished_stage_and_refuses_an_unfinished_one(tmp_path):
    stage_dir = tmp_path / "run" / "train"
    with pytest.raises(UserError, match="manifest.json not found: run `finetune train RECIPE` first"):
        artifacts.from_folder(artifacts.Trained, stage_dir)
    stage_dir.mkdir(parents=True)
    manifest = {"stage": "train", "outputs": artifacts.to_outputs(trained(tmp_path / "run", tmp_path / "b"),
                                                                  tmp_path / "run")}
    runs.atomic_write_json(stage_dir / "manifest.json", manifest)
    rec = artifacts.from_folder(artifacts.Trained, stage_dir)
    assert rec.adapter == tmp_path / "run" / "train" / "adapter"
    assert rec.manifest_id == runs.manifest_id(manifest)
    assert artifacts.Upstream(trained=rec).ids() == {"train": rec.manifest_id}


# Reading a manifest's outputs, or a stage's manifest at all, happens only in these homes: the records
# (artifacts), the staleness rules (freshness) and the manifest I/O (runs). prepare reads its own manifest to reuse
# its outputs; train checks whether its own folder holds a finished run.
READERS = re.compile(r"read_manifest\(|require_stage\(|require_fresh\(|\[[\"']outputs[\"']\]|\.get\([\"']outputs[\"']"
                     r"|json\.loads\([^)]*manifest")
HOMES = {"finetune/run/artifacts.py", "finetune/run/freshness.py", "finetune/run/runs.py"}
OWN_MANIFEST = {"finetune/prepare.py": 2}  # _reusable: prepare's own manifest and outputs


def test_no_module_reads_another_stages_manifest_except_through_the_records(repo_root):
    found: dict[str, int] = {}
    for folder in ("finetune", "serve", "scripts"):
        for path in sorted((repo_root / folder).rglob("*.py")):
            rel = str(path.relative_to(repo_root))
            if rel in HOMES:
                continue
            hits = [line for line in path.read_text().splitlines() if READERS.search(line)]
            if hits:
                found[rel] = len(hits)
    assert found == OWN_MANIFEST


def test_a_field_added_later_reads_as_its_default_from_an_older_manifest(tmp_path):
    rec = artifacts.Exported(merged=tmp_path / "export" / "merged", gguf={}, quantization=tmp_path / "export" / "q.json",
                             quantization_chart=tmp_path / "export" / "quantization.png")
    outputs = artifacts.to_outputs(rec, tmp_path)
    assert outputs["quantization_chart"] == "export/quantization.png"
    assert artifacts.from_outputs(artifacts.Exported, outputs, tmp_path) == rec
    del outputs["quantization_chart"]  # an export written before the chart was recorded
    older = artifacts.from_outputs(artifacts.Exported, outputs, tmp_path)
    assert older.quantization_chart is None and older.quantization == rec.quantization


@pytest.mark.parametrize(("types", "picked", "asked", "served"), [
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", None, "Q4_K_M"),
    (["F16", "Q8_0", "Q4_K_M"], None, None, "Q8_0"),
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", "F16", "F16"),
    (["F16", "Q8_0", "Q4_K_M"], "Q4_K_M", "auto", "Q4_K_M"),
    (["F16", "Q8_0"], None, "auto", "Q8_0"),       # auto with nothing picked: the recommended type
    (["F16", "Q8_0"], None, "Q5_K_M", "Q8_0"),     # asked for a type not exported: the recommended type
])
def test_the_type_the_modelfile_serves(types, picked, asked, served):
    assert artifacts.served_type(types, picked, asked) == served


def test_summary_is_what_a_stage_wrote_next_to_its_record(tmp_path):
    from finetune import recipe

    r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path)})
    assert artifacts.summary(r, artifacts.Exported) == {}
    with runs.StageRun(r, "export", aside=True) as stage:
        stage.extra["summary"] = {"sizes": {"F16": 3}, "warnings": []}
    assert artifacts.summary(r, artifacts.Exported) == {"sizes": {"F16": 3}, "warnings": []}
