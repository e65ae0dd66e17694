"""Bad input met by the stages, through the real CLI: each case checks the exit code, a one-line message naming
the culprit, that the user's files are byte-identical afterwards, and that no finished-looking output is left
(or that the previous finished output is exactly as it was). Empty and degenerate splits, stale prepared data,
finished work kept when a later run fails, and errors that used to read as internal errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml


def chat(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}: what is {i} times {i + 3}?"},
                         {"role": "assistant", "content": answer or f"The product of {i} and {i + 3} is {i * (i + 3)}."}]}


def write_jsonl(path: Path, rows: list[dict], extra: dict | None = None) -> Path:
    path.write_text("".join(json.dumps({**r, **(extra or {})}) + "\n" for r in rows))
    return path


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    """A recipe file next to its data; returns (write(recipe dict updates) -> path, tmp_path)."""

    def write(data: dict | None = None, **top) -> Path:
        doc = {"name": "bad", "seed": 3, "runs_dir": str(tmp_path / "runs"),
               "model": {"id": str(tiny_model_dir), "dtype": "float32"},
               "data": {"sources": [{"path": "data.jsonl"}], **(data or {})},
               "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "save_every": 100}, **top}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write, tmp_path


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------- empty training split
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "whitespace"])
def test_an_empty_data_file_stops_prepare(cli, project, content):
    write, tmp = project
    (tmp / "data.jsonl").write_text(content)
    recipe = write()
    before = digest([tmp / "data.jsonl", recipe])
    code, _, err = cli("prepare", str(recipe))
    assert code == 2
    assert "no rows were read from data.jsonl" in one_line_error(err) and "empty" in err
    assert digest([tmp / "data.jsonl", recipe]) == before
    assert not (tmp / "runs" / "bad" / "prepare" / "manifest.json").exists()


def test_every_row_dropped_names_the_counts_reasons_and_the_fix(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(6)] + [{"messages": [{"role": "user", "content": "x"}]}])
    code, _, err = cli("prepare", str(write({"clean": {"max_tokens": 8}})))
    line = one_line_error(err)
    assert code == 2
    assert "all 7 rows read were dropped" in line and "6 too_long" in line and "1 no_assistant_turn" in line
    assert "data.clean.max_tokens (now 8)" in line and "data.jsonl:1" in line
    assert not (tmp / "runs" / "bad" / "prepare" / "manifest.json").exists()


def test_a_tiny_weight_that_removes_every_training_row(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(4)])
    code, _, err = cli("prepare", str(write({"sources": [{"path": "data.jsonl", "weight": 0.001}],
                                             "split": {"validation": 0, "test": 0}})))
    assert code == 2 and "data.sources[0].weight=0.001" in one_line_error(err) and "Raise the weight" in err


def test_a_tiny_weight_is_blamed_even_when_rows_went_to_validation_and_test(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    code, _, err = cli("prepare", str(write({"sources": [{"path": "data.jsonl", "weight": 0.01}],
                                             "split": {"validation": 0.1, "test": 0.1}})))
    line = one_line_error(err)
    assert code == 2 and "data.sources[0].weight=0.01 resampled all 8 training rows away" in line
    assert "(the other rows went 1 to validation and 1 to test)" in line and "Raise the weight" in line
    assert "lower data.split" not in line
    assert not (tmp / "runs" / "bad" / "prepare" / "manifest.json").exists()


def test_sources_with_only_held_out_roles(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(4)])
    code, _, err = cli("prepare", str(write({"sources": [{"path": "data.jsonl", "role": "test"}]})))
    assert code == 2 and "4 to test" in one_line_error(err) and "no source has role: train" in err


# --------------------------------------------------------------------------------------------- degenerate splits
def test_three_rows_still_get_a_validation_and_a_test_example(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(3)])
    recipe = write()
    code, out, err = cli("prepare", str(recipe))
    assert code == 0, err
    report = json.loads((tmp / "runs" / "bad" / "prepare" / "report.json").read_text())
    assert report["splits"] == {"train": 1, "validation": 1, "test": 1} and report["notes"] == []


def test_one_group_keeps_training_and_explains_why_there_is_no_validation(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(8)], extra={"conversation": "same"})
    code, out, err = cli("prepare", str(write({"split": {"group_by": "conversation"}})))
    assert code == 0, err
    report = json.loads((tmp / "runs" / "bad" / "prepare" / "report.json").read_text())
    assert report["splits"] == {"train": 8, "validation": 0, "test": 0}
    assert any("share one data.split.group_by value" in n for n in report["notes"])
    assert "note: the validation split is empty although data.split.validation is 0.1" in out


@pytest.mark.parametrize("asked", ["validation_zero", "roles"])
def test_training_without_a_validation_split_says_so_once(cli, project, asked):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(12)])
    write_jsonl(tmp / "test.jsonl", [chat(i) for i in range(50, 53)])
    if asked == "roles":
        recipe = write({"sources": [{"path": "data.jsonl", "role": "train"}, {"path": "test.jsonl", "role": "test"}]})
    else:
        recipe = write({"split": {"validation": 0, "test": 0.2}})
    assert cli("prepare", str(recipe))[0] == 0
    code, out, err = cli("train", str(recipe), "train.early_stopping_patience=1")
    assert code == 0, err
    assert err.count("the validation split is empty") == 1 and "early stopping and best-step selection are off" in err
    summary = json.loads((tmp / "runs" / "bad" / "train" / "summary.json").read_text())
    assert summary["validation_rows"] == 0 and summary["validation"].startswith("off")
    assert summary["best_step"] is None and summary["final_val_loss"] is None


def test_eval_on_an_empty_test_split(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write({"split": {"validation": 0.2, "test": 0}})
    assert cli("prepare", str(recipe))[0] == 0
    assert cli("train", str(recipe))[0] == 0
    code, _, err = cli("eval", str(recipe))
    line = one_line_error(err)
    assert code == 2 and "the test split is empty" in line and "data.split.test" in line and "eval.split=validation" in line
    assert not (tmp / "runs" / "bad" / "eval").exists()


# -------------------------------------------------------------------------------------------- stale inputs
def test_train_refuses_data_replaced_after_prepare_even_with_an_older_mtime(cli, project):
    import os

    write, tmp = project
    data = write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write()
    assert cli("prepare", str(recipe))[0] == 0
    old = data.stat()
    write_jsonl(data, [chat(i, answer=f"Answer {i}, for real.") for i in range(10)])
    os.utime(data, (old.st_atime - 3600, old.st_mtime - 3600))
    code, _, err = cli("train", str(recipe))
    assert code == 2
    assert one_line_error(err) == (f"error: prepared data is stale because the content of data file {data} changed: "
                                   f"run `finetune prepare {recipe}` (or `finetune run`, which rebuilds what is stale)")
    assert not (tmp / "runs" / "bad" / "train").exists()


def test_a_data_override_on_train_is_refused_instead_of_recorded(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write()
    assert cli("prepare", str(recipe))[0] == 0
    code, _, err = cli("train", str(recipe), "data.system_prompt=Be brief.", "data.clean.max_tokens=16")
    assert code == 2
    assert "prepared data is stale because data.clean.max_tokens, data.system_prompt changed" in one_line_error(err)
    assert not (tmp / "runs" / "bad" / "train").exists()


# ------------------------------------------------------------------------------------ finished work is kept
def test_a_failed_prepare_keeps_the_previous_prepared_data(cli, project):
    write, tmp = project
    data = write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write()
    assert cli("prepare", str(recipe))[0] == 0
    out = tmp / "runs" / "bad" / "prepare"
    before = tree(out)
    data.write_text("")
    assert cli("prepare", str(recipe))[0] == 2
    assert tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock", "prepare"]  # no partial folder left behind


def test_a_failed_train_keeps_the_previous_adapter(cli, project, tiny_model_dir):
    from finetune import recipe as recipe_mod
    from finetune import train

    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write()
    assert cli("prepare", str(recipe))[0] == 0
    assert cli("train", str(recipe))[0] == 0
    out = tmp / "runs" / "bad" / "train"
    before = tree(out)
    # refused before anything is touched
    code, _, err = cli("train", str(recipe), "train.method=qlora")
    assert code == 2 and "qlora needs a CUDA GPU" in one_line_error(err)
    code, _, err = cli("train", str(recipe), "model.attn_implementation=flash_attention_2")
    assert code == 2 and "flash_attention_2 needs a CUDA GPU" in one_line_error(err)
    assert tree(out) == before
    # a failure in the middle of training (here: the pruning callback raises) leaves the finished run as it was

    def boom(step: int, loss: float) -> bool:
        raise RuntimeError("failed mid-run")

    with pytest.raises(RuntimeError, match="failed mid-run"):
        train.run(recipe_mod.load(recipe, ["train.max_steps=3"]), on_eval=boom)
    assert tree(out) == before


def test_a_failed_export_keeps_the_previous_export(cli, project):
    from finetune import recipe as recipe_mod
    from finetune.run import runs

    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(10)])
    recipe = write()
    assert cli("prepare", str(recipe))[0] == 0
    assert cli("train", str(recipe))[0] == 0
    with runs.StageRun(recipe_mod.load(recipe), "export", aside=True) as stage:  # a finished earlier export
        (stage.work / "bad-F16.gguf").write_bytes(b"GGUF earlier export")
    out = tmp / "runs" / "bad" / "export"
    before = tree(out)
    # the trained tokenizer lost its chat template: export stops inside the stage, after it began
    adapter = tmp / "runs" / "bad" / "train" / "adapter"
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = cli("export", str(recipe))
    assert code == 2 and "has no chat template" in one_line_error(err)
    assert tree(out) == before and not (out.parent / ".export.partial").exists()


def test_a_failed_eval_keeps_the_previous_report(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(12)])
    recipe = write(eval={"metrics": ["exact_match"], "max_new_tokens": 2, "gguf": False})
    assert cli("prepare", str(recipe))[0] == 0
    assert cli("train", str(recipe))[0] == 0
    assert cli("eval", str(recipe))[0] == 0
    out = tmp / "runs" / "bad" / "eval"
    before = tree(out)
    adapter = tmp / "runs" / "bad" / "train" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(b"not safetensors")  # the trained weights are damaged after training
    code, _, err = cli("eval", str(recipe))
    assert code == 1 and "--debug" in err  # an unexpected failure inside a stage stays an internal error
    assert tree(out) == before


# --------------------------------------------------------------------- errors that used to read as internal
def test_runs_dir_pointing_at_a_file(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(4)])
    (tmp / "runs.txt").write_text("notes\n")
    code, _, err = cli("prepare", str(write(runs_dir=str(tmp / "runs.txt"))))
    assert code == 2 and "runs.txt is a file, not a folder" in one_line_error(err) and "runs_dir" in err
    assert (tmp / "runs.txt").read_text() == "notes\n"


def test_a_text_file_named_gguf_as_the_model(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(4)])
    (tmp / "model.gguf").write_text("<html>404 Not Found</html>\n")
    recipe = write(model={"id": "model.gguf"})
    code, _, err = cli("prepare", str(recipe))
    line = one_line_error(err)
    assert code == 2 and "model.id: " in line and "model.gguf is not a GGUF (it starts with '<html>404 No'" in line
    assert (tmp / "model.gguf").read_text() == "<html>404 Not Found</html>\n"


def test_a_model_that_needs_trust_remote_code(cli, project, tiny_model_dir):
    import shutil

    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(4)])
    model = tmp / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom_arch", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                         "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = cli("prepare", str(write(model={"id": str(model)})))
    line = one_line_error(err)
    assert code == 2 and "model.trust_remote_code: true" in line and "runs Python code" in line
    assert "huggingface.co" not in line


# ------------------------------------------------------------------- a text file named .gguf, at every door (issue 29)
@pytest.mark.parametrize("command", ["serve", "chat"])
def test_a_text_file_named_gguf_is_not_loaded_by_serve_or_chat(cli, tmp_path, command):
    (tmp_path / "model.gguf").write_text("<html>404 Not Found</html>\n")
    code, _, err = cli(command, str(tmp_path / "model.gguf"))
    line = one_line_error(err)
    assert code == 2 and f"{tmp_path / 'model.gguf'} is not a GGUF (it starts with '<html>404 No', not GGUF)" in line
    assert "Failed to load" not in err
    assert (tmp_path / "model.gguf").read_text() == "<html>404 Not Found</html>\n"


def test_the_llama_cpp_door_checks_the_gguf_magic_before_loading(tmp_path):
    from finetune.errors import UserError
    from finetune.gguf import runtime

    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.gguf is not a GGUF \(it is empty\)"):
        runtime.inspect(tmp_path / "empty.gguf")
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" * 4)
    with pytest.raises(UserError, match=r"zip.gguf is not a GGUF \(it starts with '50 4b 03 04', not GGUF\)"):
        runtime.chat(tmp_path / "zip.gguf", [[{"role": "user", "content": "hi"}]])
    (tmp_path / "real.gguf").write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(UserError, match=r"adapter: .*notes.txt is not a GGUF"):
        (tmp_path / "notes.txt").write_text("my adapter\n")
        runtime.chat(tmp_path / "real.gguf", [[{"role": "user", "content": "hi"}]], lora_path=tmp_path / "notes.txt")


# ------------------------------------------------------------------ settings that work but should say so (issue 29)
def test_trust_remote_code_is_one_warning_line_in_our_words(cli, project, tiny_model_dir):
    """Run as a user runs it (a child process: pytest's own warning capture would hide the console's)."""
    import os
    import subprocess
    import sys

    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(6)])
    recipe = write(model={"id": str(tiny_model_dir), "trust_remote_code": True, "dtype": "float32"})
    assert cli("prepare", str(recipe))[0] == 0
    proc = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe), "train.max_steps=1"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                          env=dict(os.environ, HF_HUB_OFFLINE="1", FINETUNE_DEBUG="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "trust_remote_code is on" in line]
    assert lines == [f"warning: trust_remote_code is on for {tiny_model_dir}: Python code shipped with the model will "
                     "run"], proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_half_precision_on_a_cpu_and_an_oversized_grad_accum_are_noted(cli, project):
    write, tmp = project
    write_jsonl(tmp / "data.jsonl", [chat(i) for i in range(6)])
    recipe = write({"split": {"validation": 0, "test": 0}})
    assert cli("prepare", str(recipe))[0] == 0
    code, out, err = cli("train", str(recipe), "model.dtype=float16", "train.grad_accum=8", "train.max_steps=1")
    assert code == 0, err
    assert "train: note: model.dtype float16 on a CPU: most CPUs emulate float16 matrix products" in err
    assert ("train: note: train.grad_accum is 8, but an epoch holds only 2 micro-batches of train.batch_size 4: one "
            "optimizer step per epoch") in err
    code, out, err = cli("train", str(recipe), "train.grad_accum=2", "train.max_steps=1")
    assert code == 0 and "note:" not in err, err
