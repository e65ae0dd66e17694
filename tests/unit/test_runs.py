from __future__ import annotations

import json

import pytest

from finetune import recipe, runs


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with runs.atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with runs.atomic_dir(final) as tmp:
        (tmp / "done.txt").write_text("y")
    assert (final / "done.txt").read_text() == "y"


def test_manifest_records_recipe_versions_and_outputs(tmp_path):
    r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path)})
    with runs.StageRun(r, "prepare", inputs={"data": "abc"}) as run:
        run.outputs["file"] = "x.jsonl"
    m = json.loads((tmp_path / "m" / "prepare" / "manifest.json").read_text())
    assert m["recipe"]["name"] == "m" and m["inputs"] == {"data": "abc"} and m["outputs"] == {"file": "x.jsonl"}
    assert m["versions"]["transformers"] and m["versions"]["torch"]


def test_failed_stage_has_no_manifest(tmp_path):
    r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path)})
    with pytest.raises(ValueError):
        with runs.StageRun(r, "train"):
            raise ValueError("boom")
    assert runs.read_manifest(tmp_path / "m" / "train") is None
