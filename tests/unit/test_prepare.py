"""Stage `prepare` on small fixture files: formats, every defect with its exact count and file:line, splits,
leakage, caching, bad input, the output contract, and the CLI. The tokenizer is the embedded model's real one
(on a tiny random model, since only the tokenizer matters here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune import recipe as recipe_mod
from finetune.errors import UserError
from finetune.run import artifacts

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir):
    """Write a recipe next to the data and load it; `sources` entries may name fixture files by bare name."""

    def make(sources: list[dict], **data) -> recipe_mod.Recipe:
        srcs = []
        for s in sources:
            s = dict(s)
            if "path" in s and not Path(s["path"]).is_absolute() and (FIXTURES / s["path"]).exists():
                s["path"] = str(FIXTURES / s["path"])
            srcs.append(s)
        split = data.pop("split", {"validation": 0, "test": 0})
        doc = {"name": "t", "seed": data.pop("seed", 1), "runs_dir": str(tmp_path / "runs"),
               "model": {"id": str(tiny_model_dir)}, "data": {"sources": srcs, "split": split, **data}}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(doc))
        return recipe_mod.load(path)

    return make


def prepare(r, **kw):
    from finetune import prepare as prepare_mod

    return prepare_mod.run(r, **kw)


def read_split(r, split: str) -> list[dict]:
    path = r.run_dir("prepare") / "splits" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_defect_is_counted_with_its_line(make_recipe):
    r = make_recipe([{"path": "defects.jsonl"}], clean={"max_tokens": 128})
    report = prepare(r)
    assert report["rows_in"] == 16  # 17 lines, one blank
    assert report["dropped"] == {
        "empty_turn": 1, "exact_duplicate": 1, "malformed_json": 1, "missing_field": 1, "near_duplicate": 1,
        "not_an_object": 1, "not_ending_with_assistant": 1, "null_field": 1, "system_not_first": 1, "too_long": 1,
        "unknown_role": 1, "unsupported_content": 1,
    }
    samples = report["samples"]
    assert samples["malformed_json"][0]["origin"] == "defects.jsonl:3"
    assert samples["not_an_object"][0]["origin"] == "defects.jsonl:4"
    assert samples["empty_turn"][0]["origin"] == "defects.jsonl:5"
    assert samples["unknown_role"][0]["origin"] == "defects.jsonl:6"
    assert samples["not_ending_with_assistant"][0]["origin"] == "defects.jsonl:7"
    assert samples["exact_duplicate"][0] | {"row": ""} == {
        "origin": "defects.jsonl:8", "detail": "same as defects.jsonl:1", "row": ""}
    assert samples["near_duplicate"][0]["origin"] == "defects.jsonl:9"
    assert "defects.jsonl:2" in samples["near_duplicate"][0]["detail"]
    assert samples["missing_field"][0]["origin"] == "defects.jsonl:10"
    assert samples["null_field"][0]["origin"] == "defects.jsonl:12"
    assert samples["too_long"][0]["origin"] == "defects.jsonl:15"
    assert samples["unsupported_content"][0]["origin"] == "defects.jsonl:16"
    assert samples["system_not_first"][0]["origin"] == "defects.jsonl:17"
    assert report["deduped"] == {"exact": 1, "near": 1}
    assert report["splits"] == {"train": 4, "validation": 0, "test": 0}
    assert report["normalized"] == 1  # line 14: double spaces, NBSP, trailing blanks
    rows = {row["origin"]: row for row in read_split(r, "train")}
    assert set(rows) == {"defects.jsonl:1", "defects.jsonl:2", "defects.jsonl:13", "defects.jsonl:14"}
    assert rows["defects.jsonl:14"]["messages"][0]["content"] == "Describe the ocean in detail."
    assert rows["defects.jsonl:13"]["messages"][0]["content"] == "Translate 'good night' into German."
    # the written report is the returned one
    on_disk = json.loads((r.run_dir("prepare") / "report.json").read_text())
    assert on_disk["dropped"] == report["dropped"]


def test_overlong_rows_can_be_truncated_instead(make_recipe):
    r = make_recipe([{"path": "defects.jsonl"}], clean={"max_tokens": 128, "overlong": "truncate"})
    report = prepare(r)
    assert "too_long" not in report["dropped"] and report["truncated"] == 1
    assert report["tokens"]["train"]["max"] == 128


@pytest.mark.parametrize(
    ("name", "fmt", "rows_in", "kept", "dropped"),
    [
        ("sharegpt.json", "sharegpt", 4, 3, {"unknown_role": 1}),
        ("alpaca.json", "alpaca", 4, 3, {"null_field": 1}),
        ("prompt_completion.tsv", "prompt_completion", 4, 3, {"malformed_row": 1}),
        ("text.txt", "text", 3, 3, {}),
    ],
)
def test_formats_are_detected(make_recipe, name, fmt, rows_in, kept, dropped):
    r = make_recipe([{"path": name}])
    report = prepare(r)
    assert report["sources"][0]["format"] == fmt
    assert report["rows_in"] == rows_in
    assert report["dropped"] == dropped
    assert report["splits"]["train"] == kept


def test_format_conversions(make_recipe):
    r = make_recipe([{"path": "sharegpt.json"}, {"path": "alpaca.json"}, {"path": "text.txt"}],
                    default_input="", system_prompt="Default system.")
    report = prepare(r)
    rows = {row["origin"]: row for row in read_split(r, "train")}
    assert rows["sharegpt.json:[0]"]["messages"] == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Largest ocean on Earth?"},
        {"role": "assistant", "content": "The Pacific."}]
    assert [m["role"] for m in rows["sharegpt.json:[1]"]["messages"]] == [
        "system", "user", "assistant", "user", "assistant"]
    assert rows["alpaca.json:[1]"]["messages"][1:] == [
        {"role": "user", "content": "Sum the numbers.\n\n4 and 9"}, {"role": "assistant", "content": "13"}]
    assert rows["alpaca.json:[2]"]["messages"][0] == {"role": "system", "content": "Default system."}
    assert report["filled"] == {"system_prompt": 5, "default_input": 1, "group_missing": 0}
    assert rows["text.txt:4"]["text"].startswith("In winter the storms")
    # raw text trains on every token; chat rows only on replies
    import datasets

    ds = datasets.load_from_disk(str(r.run_dir("prepare") / "tokenized" / "train"))
    order = list(rows)
    text_row = ds[order.index("text.txt:1")]
    assert text_row["labels"] == text_row["input_ids"] and text_row["input_ids"][-1] == 2  # ends with EOS
    chat_row = ds[order.index("sharegpt.json:[0]")]
    assert -100 in chat_row["labels"] and chat_row["length"] == len(chat_row["input_ids"])


def test_parquet_source(make_recipe, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["Two plus two?", "Color of grass?", None],
                             "completion": ["Four.", "Green.", "Orphan."]}), path)
    report = prepare(make_recipe([{"path": str(path)}]))
    assert report["sources"][0]["format"] == "prompt_completion"
    assert report["dropped"] == {"null_field": 1}
    assert report["samples"]["null_field"][0]["origin"] == "pc.parquet:row 3"


def test_unknown_columns_say_which_mapping_to_write(make_recipe):
    r = make_recipe([{"path": "qa.csv"}])
    with pytest.raises(UserError) as err:
        prepare(r)
    msg = str(err.value)
    assert "qa.csv" in msg and "question, answer, topic" in msg
    assert "columns: {prompt: question, completion: answer}" in msg
    # writing that mapping makes it work
    r = make_recipe([{"path": "qa.csv", "format": "prompt_completion",
                      "columns": {"prompt": "question", "completion": "answer"}}])
    report = prepare(r)
    assert report["splits"]["train"] == 4 and not report["dropped"]
    assert read_split(r, "train")[2]["messages"][-1]["content"] == "Mercury, a heavy metal."


def test_mapping_to_a_field_the_format_lacks_is_an_error(make_recipe):
    r = make_recipe([{"path": "qa.csv", "format": "alpaca", "columns": {"question": "question"}}])
    with pytest.raises(UserError, match=r"columns: question is not a field of format 'alpaca'.*instruction"):
        prepare(r)


def test_bad_files_are_clear_errors(make_recipe, tmp_path):
    with pytest.raises(UserError, match=r"data.sources\[0\].path: file not found: .*nope.jsonl"):
        prepare(make_recipe([{"path": str(tmp_path / "nope.jsonl")}]))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt,completion\ncaf\xe9?,yes\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.csv is not UTF-8 text \(bad byte 0xe9 at line 2\)"):
        prepare(make_recipe([{"path": str(latin)}]))
    binary = tmp_path / "model.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(UserError, match="model.jsonl looks like a binary file"):
        prepare(make_recipe([{"path": str(binary)}]))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": ')
    with pytest.raises(UserError, match=r"broken.json: not valid JSON \(line 2"):
        prepare(make_recipe([{"path": str(broken)}]))


def _split_ids(r) -> dict[str, list[str]]:
    return {s: [row["id"] for row in read_split(r, s)] for s in ("train", "validation", "test")}


def test_split_is_deterministic_and_changes_with_the_seed(make_recipe):
    split = {"validation": 0.2, "test": 0.2}
    r1 = make_recipe([{"path": "groups.jsonl"}], split=split, seed=1)
    prepare(r1)
    first = _split_ids(r1)
    prepare(r1, force=True)
    assert _split_ids(r1) == first
    assert {k: len(v) for k, v in first.items()} == {"train": 22, "validation": 7, "test": 7}
    r2 = make_recipe([{"path": "groups.jsonl"}], split=split, seed=2)
    prepare(r2)
    assert _split_ids(r2) != first


def test_group_aware_split_keeps_each_group_in_one_split(make_recipe):
    r = make_recipe([{"path": "groups.jsonl"}], split={"validation": 0.25, "test": 0.25, "group_by": "conversation_id"})
    report = prepare(r)
    source = {json.loads(line)["messages"][0]["content"]: json.loads(line)["conversation_id"]
              for line in (FIXTURES / "groups.jsonl").read_text().splitlines()}
    where: dict[str, set[str]] = {}
    for split in ("train", "validation", "test"):
        for row in read_split(r, split):
            where.setdefault(source[row["messages"][0]["content"]], set()).add(split)
    assert all(len(s) == 1 for s in where.values()) and len(where) == 12
    assert report["splits"] == {"train": 18, "validation": 9, "test": 9}


def test_leakage_check_catches_a_planted_near_duplicate_across_train_and_test(make_recipe, tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "groups.jsonl").read_text().splitlines()][:10]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    planted = json.loads(json.dumps(rows[4]))
    planted["messages"][0]["content"] = planted["messages"][0]["content"].upper() + "!"  # same words, other case
    exact = rows[7]
    test.write_text(json.dumps(planted) + "\n" + json.dumps(exact) + "\n")
    sources = [{"path": str(train), "role": "train"}, {"path": str(test), "role": "test"}]
    # dedupe off, so only the leakage check can catch them
    r = make_recipe(sources, clean={"dedupe": False, "near_dedupe": False})
    report = prepare(r)
    assert report["leakage_removed"] == {"leakage_near": 1, "leakage_exact": 1}
    assert report["splits"] == {"train": 8, "validation": 0, "test": 2}
    near = report["samples"]["leakage_near"][0]
    assert near["origin"] == "train.jsonl:5" and "test row test.jsonl:1" in near["detail"]
    # with the check off they stay (and the report says nothing was removed)
    r = make_recipe(sources, clean={"dedupe": False, "near_dedupe": False}, split={"validation": 0, "test": 0,
                                                                                 "leakage_check": False})
    assert prepare(r)["splits"]["train"] == 10


def test_outputs_follow_the_contract_and_are_reused_until_inputs_change(make_recipe, tmp_path):
    import datasets

    data = tmp_path / "d.jsonl"
    data.write_bytes((FIXTURES / "groups.jsonl").read_bytes())
    r = make_recipe([{"path": str(data)}], split={"validation": 0.1, "test": 0.1})
    first = prepare(r)
    assert first["reused"] is False
    out = r.run_dir("prepare")
    prepared = artifacts.load(r, artifacts.Prepared)
    assert prepared.rows == first["splits"]
    for split in ("train", "validation", "test"):
        ds = datasets.load_from_disk(prepared.tokenized[split])
        assert ds.column_names == ["input_ids", "labels", "length"] and len(ds) == first["splits"][split]
        rows = [json.loads(line) for line in prepared.splits[split].read_text().splitlines()]
        assert all(set(row) == {"id", "messages", "origin"} for row in rows)
    assert (out / "lengths.png").stat().st_size > 1000
    assert prepare(r)["reused"] is True
    # another setting -> rebuilt
    r2 = make_recipe([{"path": str(data)}], split={"validation": 0.2, "test": 0.1})
    assert prepare(r2)["reused"] is False
    # changed file content -> rebuilt; the user's file is never modified by prepare
    before = data.read_bytes()
    data.write_bytes(before + before.splitlines(keepends=True)[0].replace(b"c0", b"c99"))
    again = prepare(r2)
    assert again["reused"] is False and again["dropped"] == {"exact_duplicate": 1}
    assert prepare(r2, force=True)["reused"] is False


def test_weights_and_caps(make_recipe):
    r = make_recipe([{"path": "groups.jsonl", "max_rows": 20, "weight": 2.0}])
    report = prepare(r)
    assert report["rows_in"] == 20 and report["splits"]["train"] == 40
    assert report["weights"] == {"train_rows_added": 20}


def test_cli_prints_the_summary_and_fails_cleanly(cli, make_recipe, tmp_path):
    r = make_recipe([{"path": "defects.jsonl"}], clean={"max_tokens": 128})
    code, out, err = cli("prepare", str(tmp_path / "recipe.yaml"))
    assert code == 0, err
    assert "exact_duplicate" in out and "malformed_json" in out and "p50" in out
    assert (r.run_dir("prepare") / "manifest.json").exists()
    make_recipe([{"path": str(tmp_path / "missing.jsonl")}])
    code, out, err = cli("prepare", str(tmp_path / "recipe.yaml"))
    assert code == 2 and "file not found" in err and "Traceback" not in err


def test_quickstart_recipe_prepares_with_visible_cleaning(repo_root, tmp_path, tiny_model_dir):
    r = recipe_mod.load(repo_root / "recipes" / "quickstart.yaml",
                        [f"runs_dir={tmp_path / 'runs'}", f"model.id={tiny_model_dir}"])
    report = prepare(r)
    assert report["dropped"] == {
        "empty_turn": 2, "exact_duplicate": 10, "malformed_json": 1, "missing_field": 1, "near_duplicate": 8,
        "no_assistant_turn": 1, "not_ending_with_assistant": 1, "unknown_role": 1}
    assert report["splits"] == {"train": 400, "validation": 50, "test": 50}
    assert report["normalized"] == 12
    # short examples, short exact answers: the training budget of the quickstart depends on it
    assert 60 <= report["tokens"]["train"]["p50"] <= 90 and report["tokens"]["train"]["max"] <= 128
    test_rows = read_split(r, "test")
    answer = json.loads(test_rows[0]["messages"][-1]["content"])
    assert list(answer) == ["order", "item", "issue", "name"]


def test_hub_source_offline_is_a_clear_error(make_recipe):
    # conftest sets HF_DATASETS_OFFLINE=1: the real datasets.load_dataset path runs and cannot reach the Hub
    r = make_recipe([{"hub": "someone/not-cached-here", "split": "train", "revision": "main"}])
    with pytest.raises(UserError, match=r"data.sources\[0\].hub: Hub dataset 'someone/not-cached-here' not found or "
                                        r"not reachable"):
        prepare(r)


def test_group_by_a_column_no_row_has_is_an_error(make_recipe):
    r = make_recipe([{"path": "groups.jsonl"}], split={"validation": 0.2, "test": 0.2, "group_by": "conv_id"})
    with pytest.raises(UserError, match="no row has a column 'conv_id'; columns found: conversation_id, messages"):
        prepare(r)


def test_hub_only_keys_on_a_local_source_are_rejected(make_recipe):
    with pytest.raises(recipe_mod.RecipeError, match="revision is for Hub sources"):
        make_recipe([{"path": "groups.jsonl", "revision": "main"}])


def test_rows_the_chat_template_refuses_are_reported(make_recipe, tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "no-system-model"
    shutil.copytree(tiny_model_dir, model)
    # like Gemma's template: a system message is an error
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    r = make_recipe([{"path": "sharegpt.json"}])  # row 1 has a system turn
    r.model.id = str(model)
    report = prepare(r)
    assert report["dropped"] == {"template_error": 1, "unknown_role": 1}
    assert "System role not supported" in report["samples"]["template_error"][0]["detail"]
    assert report["samples"]["template_error"][0]["origin"] == "sharegpt.json:[0]"
    r = make_recipe([{"path": "sharegpt.json"}], system_prompt="Always answer.")  # now every row has one
    r.model.id = str(model)
    with pytest.raises(UserError, match=r"chat template refused all 3 rows.*System role not supported"):
        prepare(r)


def test_json_file_holding_json_lines_and_column_json(make_recipe, tmp_path):
    lines = (FIXTURES / "groups.jsonl").read_text().splitlines()[:6]
    as_json = tmp_path / "really_lines.json"
    as_json.write_text("\n".join(lines) + "\n")
    report = prepare(make_recipe([{"path": str(as_json)}]))
    assert report["rows_in"] == 6 and report["sources"][0]["format"] == "messages"
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"prompt": ["Two plus two?", "Capital of Peru?"], "completion": ["Four.", "Lima."]}))
    report = prepare(make_recipe([{"path": str(columns)}]))
    assert report["sources"][0]["format"] == "prompt_completion" and report["splits"]["train"] == 2


def test_mixing_sources_with_a_weight_below_one(make_recipe):
    r = make_recipe([{"path": "groups.jsonl", "weight": 0.5}, {"path": "sharegpt.json"}])
    report = prepare(r)
    kept = report["splits"]["train"]
    assert report["weights"]["train_rows_removed"] == 36 - (kept - 3)
    assert 8 <= kept - 3 <= 28  # about half of the 36 rows, deterministically
    assert prepare(r, force=True)["splits"]["train"] == kept
