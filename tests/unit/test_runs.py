from __future__ import annotations

import json
import os

import pytest

from finetune import recipe
from finetune.run import runs


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


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_stage_built_aside_replaces_the_old_folder_only_on_success(tmp_path):
    r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path)})
    with runs.StageRun(r, "export", aside=True) as stage:
        (stage.work / "model.gguf").write_text("first")
    final = tmp_path / "m" / "export"
    before = _tree(final)
    assert set(before) == {"model.gguf", "manifest.json"}
    for error in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with runs.StageRun(r, "export", aside=True) as stage:
                (stage.work / "model.gguf").write_text("half")
                raise error
        assert _tree(final) == before  # byte for byte, manifest included
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["export"]  # no partial folder left
    with runs.StageRun(r, "export", aside=True) as stage:
        (stage.work / "model.gguf").write_text("second")
    assert (final / "model.gguf").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["export"]


def test_keep_partial_keeps_the_work_folder_after_a_failure(tmp_path):
    r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path)})
    with pytest.raises(RuntimeError):
        with runs.StageRun(r, "train", aside=True, keep_partial=True) as stage:
            (stage.work / "checkpoint").write_text("step 3")
            raise RuntimeError("interrupted")
    assert (tmp_path / "m" / ".train.partial" / "checkpoint").read_text() == "step 3"
    assert not (tmp_path / "m" / "train").exists()


def test_replace_dir_swaps_whole_folders(tmp_path):
    old, new = tmp_path / "final", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    runs.replace_dir(new, old)
    assert _tree(old) == {"b": b"new"} and not new.exists()


def test_runs_dir_that_is_a_file_is_a_user_error(tmp_path):
    from finetune.errors import UserError

    blocker = tmp_path / "runs.txt"
    blocker.write_text("not a folder")
    r = recipe.validate_dict({"name": "m", "runs_dir": str(blocker)})
    with pytest.raises(UserError, match=r"runs\.txt is a file, not a folder.*runs_dir"):
        with runs.StageRun(r, "prepare", aside=True):
            pass
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_runs_dir_is_a_user_error(tmp_path):
    from finetune.errors import UserError

    tmp_path.chmod(0o555)
    try:
        r = recipe.validate_dict({"name": "m", "runs_dir": str(tmp_path / "runs")})
        with pytest.raises(UserError, match="cannot write to .*runs_dir"):
            runs.make_dir(r.run_dir())
    finally:
        tmp_path.chmod(0o755)


def test_changed_keys_and_manifest_id():
    assert runs.changed_keys({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}, "x") == ["x.b.c"]
    assert runs.manifest_id(None) is None and runs.manifest_id({"a": 1}) != runs.manifest_id({"a": 2})


def test_a_second_command_on_a_run_in_use_stops_with_a_clear_error(tmp_path, tokenizer_dir):
    """Two `finetune` commands on one run would race for its folders: the second stops at once (exit 2), the
    first keeps its lock while it nests stages (`finetune run` holding it, each stage taking it again)."""
    import subprocess
    import sys

    from finetune import cli

    r = recipe.validate_dict({"name": "busy", "runs_dir": str(tmp_path / "runs"), "model": {"id": str(tokenizer_dir)},
                          "data": {"sources": [{"path": "x.jsonl"}]}})
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               f"lock = FileLock({str(r.run_dir() / '.lock')!r}); lock.acquire()\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        r.run_dir().mkdir(parents=True)
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.UserError, match=r"run 'busy' \(.*runs/busy\) is in use by another finetune "
                                                  r"command: wait for it to finish, or start `finetune train` with "
                                                  r"another name \(name=\.\.\.\)"):
            with runs.run_lock(r, "train"):
                pass
        (tmp_path / "r.yaml").write_text(f"name: busy\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {tokenizer_dir}\n"
                                         f"data:\n  sources:\n    - path: {tmp_path / 'x.jsonl'}\n")
        (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
        assert cli.main(["prepare", str(tmp_path / "r.yaml")]) == cli.EXIT_USER_ERROR
        assert not (r.run_dir() / "prepare").exists()
    finally:
        holder.kill()
        holder.wait()
    with runs.run_lock(r, "run"), runs.run_lock(r, "prepare"):  # free again, and re-entrant in one process
        pass
