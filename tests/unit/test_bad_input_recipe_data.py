"""Bad input in recipes, overrides and data files, through the real CLI: exit code 2, one line that names the file,
line, key or value at fault and the fix, no traceback, and the user's files byte-identical afterwards.

Each case writes its own recipe and data under tmp_path (runs go to tmp_path/runs, never next to the inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune import recipe as recipe_mod
from finetune.data import formats, load


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every input file under the folder (run outputs aside), by content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "runs" not in p.relative_to(folder).parts}


@pytest.fixture
def bad(cli, tmp_path):
    """Run the CLI on bad input: exit code 2, one clean line on stderr, inputs untouched. Returns stderr."""

    def run(*argv: str) -> str:
        before = snapshot(tmp_path)
        code, out, err = cli(*argv)
        assert code == 2, (code, out, err)
        assert "Traceback" not in out + err and "--debug" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert snapshot(tmp_path) == before, "an input file changed"
        return lines[0]

    return run


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


ROWS = "".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                        {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(3))


@pytest.fixture
def recipe_with_data(tmp_path):
    """A valid recipe next to a small messages file; `extra` is appended to the recipe text."""

    def make(extra: str = "", data: str = "data.jsonl") -> Path:
        write(tmp_path, "data.jsonl", ROWS)
        return write(tmp_path, "r.yaml", f"name: t\nruns_dir: {tmp_path / 'runs'}\n"
                                         f"data:\n  sources:\n    - path: {data}\n{extra}")

    return make


# ------------------------------------------------------------------------------------------- overrides
def test_a_list_item_override_works(cli, recipe_with_data, tmp_path):
    r = recipe_with_data()
    write(tmp_path, "other.jsonl", ROWS)
    code, out, err = cli("show", str(r), "data.sources.0.path=other.jsonl", "data.sources.0.format=messages")
    assert code == 0, err
    source = yaml.safe_load(out)["data"]["sources"][0]
    assert source["path"] == "other.jsonl" and source["format"] == "messages"


def test_an_override_can_add_the_next_list_item(cli, recipe_with_data, tmp_path):
    r = recipe_with_data()
    code, out, err = cli("show", str(r), "data.sources.1.path=more.jsonl")
    assert code == 0, err
    assert [s["path"] for s in yaml.safe_load(out)["data"]["sources"]] == ["data.jsonl", "more.jsonl"]


def test_a_list_index_past_the_end_names_the_override(bad, recipe_with_data):
    r = recipe_with_data()
    line = bad("show", str(r), "data.sources.3.path=x.jsonl")
    assert line.startswith("error: override 'data.sources.3.path=x.jsonl': ")
    assert "data.sources has items 0 to 0" in line and "data.sources.1." in line


def test_a_list_item_without_its_number_says_so(bad, recipe_with_data):
    line = bad("show", str(recipe_with_data()), "data.sources.path=x.jsonl")
    assert "override 'data.sources.path=x.jsonl'" in line and "data.sources is a list" in line
    assert "data.sources.0.path" in line


def test_an_override_error_blames_the_override_not_the_file(bad, recipe_with_data):
    r = recipe_with_data()
    line = bad("show", str(r), "train.batch_size=lots")
    assert line.startswith("error: override 'train.batch_size=lots': train.batch_size: ")
    assert str(r) not in line and "'lots'" in line


def test_an_override_of_a_list_item_with_a_bad_value_blames_the_override(bad, recipe_with_data):
    line = bad("show", str(recipe_with_data()), "data.sources.0.weight=0")
    assert line.startswith("error: override 'data.sources.0.weight=0': data.sources[0].weight: ")


def test_an_override_without_equals(bad, recipe_with_data):
    line = bad("show", str(recipe_with_data()), "train.lr")
    assert "override 'train.lr': expected key=value" in line


def test_command_line_numbers_stay_numbers_and_text_stays_text(cli, recipe_with_data):
    r = recipe_with_data()
    loaded = recipe_mod.load(r, ["train.lr=1e-4", "train.epochs=3", "train.max_steps=20", "model.revision=2024",
                                 "serve.host=::", "train.packing=false"])
    assert loaded.train.lr == pytest.approx(1e-4) and isinstance(loaded.train.lr, float)
    assert loaded.train.epochs == 3 and loaded.train.max_steps == 20
    assert loaded.model.revision == "2024" and loaded.serve.host == "::" and loaded.train.packing is False


# ------------------------------------------------------------------------------------------- strict types
@pytest.mark.parametrize(("line", "key", "says"), [
    ("  epochs: yes", "train.epochs", "is a boolean, not a number"),
    ("  max_steps: true", "train.max_steps", "is a boolean, not a number"),
    ('  batch_size: "8"', "train.batch_size", "a quoted value is text, not a number"),
    ("  lr: fast", "train.lr", "'fast'"),
    ("  batch_size: 8.5", "train.batch_size", "write a whole number"),
    ("  packing: 1", "train.packing", "write true or false"),
])
def test_no_silent_coercion(bad, recipe_with_data, line, key, says):
    r = recipe_with_data(f"train:\n{line}\n")
    err = bad("validate", str(r))
    assert err.startswith(f"INVALID {r}: line 7: {key}: "), err
    assert says in err


def test_yaml_1_2_floats_are_numbers_in_a_recipe(cli, recipe_with_data):
    r = recipe_with_data("train:\n  lr: 1e-4\n  weight_decay: 1E-2\n")
    loaded = recipe_mod.load(r)
    assert loaded.train.lr == pytest.approx(1e-4) and loaded.train.weight_decay == pytest.approx(0.01)


def test_a_number_where_text_belongs_says_to_quote_it(bad, tmp_path):
    r = write(tmp_path, "r.yaml", "name: 2024\n")
    assert "name: Input should be a valid string; for text, put it in quotes" in bad("show", str(r))


# ------------------------------------------------------------------------------------------- the recipe file
def test_an_empty_recipe_says_the_file_is_empty(bad, tmp_path):
    r = write(tmp_path, "r.yaml", "")
    assert "the file is empty" in bad("validate", str(r))
    r2 = write(tmp_path, "r2.yaml", "# only a comment\n\n")
    assert "the file is empty" in bad("show", str(r2), "train.lr=1e-4")


def test_a_yaml_list_recipe_is_an_error_even_with_an_override(bad, tmp_path):
    r = write(tmp_path, "r.yaml", "- name: a\n- name: b\n")
    line = bad("show", str(r), "name=x")
    assert "the top level is a list, but a recipe is a mapping" in line
    r2 = write(tmp_path, "r2.yaml", "- one\n- two\n")
    assert "the top level is a list, but a recipe is a mapping" in bad("show", str(r2), "name=x")


@pytest.mark.parametrize(("name", "text"), [
    ("rows.jsonl", ROWS),
    ("rows.csv", "question,answer\nhi,hello\n"),
    ("rows.yaml", ROWS),  # JSON lines under a recipe's name: several documents, not valid YAML
    ("row.yaml", ROWS.splitlines()[0] + "\n"),  # one JSON object: a data row, not a recipe
])
def test_a_data_file_where_the_recipe_goes_says_how_to_reference_it(bad, tmp_path, name, text):
    data = write(tmp_path, name, text)
    line = bad("prepare", str(data))
    assert "looks like a data file" in line and "data.sources" in line and str(data.resolve()) in line


@pytest.mark.parametrize(("key", "ours"), [
    ("learning_rate", "train.lr"),
    ("num_train_epochs", "train.epochs"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("lora_r", "train.lora.r"),
    ("lora_alpha", "train.lora.alpha"),
    ("max_seq_length", "data.clean.max_tokens"),
    ("gradient_accumulation_steps", "train.grad_accum"),
])
def test_names_from_other_tools_suggest_ours(bad, recipe_with_data, key, ours):
    r = recipe_with_data(f"train:\n  {key}: 1\n")
    line = bad("validate", str(r))
    assert f"line 7: train.{key}: unknown key. did you mean '{ours}'?" in line
    top = recipe_with_data(f"{key}: 1\n")
    assert f"did you mean '{ours}'?" in bad("validate", str(top))


def test_a_key_in_the_wrong_section_names_where_it_lives(bad, recipe_with_data):
    r = recipe_with_data("train:\n  max_tokens: 512\n")
    assert "train.max_tokens: unknown key. did you mean 'data.clean.max_tokens'" in bad("validate", str(r))


def test_a_section_given_as_a_single_value(bad, recipe_with_data):
    r = recipe_with_data("train: 5\n")
    line = bad("validate", str(r))
    assert "line 6: train: " in line and "(received 5)" in line


# ------------------------------------------------------------------------------------------- validate
def test_validate_passes_a_good_recipe(cli, recipe_with_data):
    code, out, err = cli("validate", str(recipe_with_data()))
    assert code == 0, err
    assert "1 valid, 0 invalid" in out


def test_validate_finds_a_missing_data_file(bad, recipe_with_data, tmp_path):
    r = recipe_with_data(data="nope.jsonl")
    line = bad("validate", str(r))
    assert f"data.sources[0].path: file not found: {tmp_path / 'nope.jsonl'}" in line


def test_validate_finds_a_data_path_that_is_a_folder(bad, recipe_with_data, tmp_path):
    write(tmp_path, "rows/a.jsonl", ROWS)
    line = bad("validate", str(recipe_with_data(data="rows")))
    assert "data.sources[0].path:" in line and "is a folder, not a file" in line and "a.jsonl" in line


def test_validate_finds_no_data_source(bad, tmp_path):
    r = write(tmp_path, "r.yaml", "name: t\ndata:\n  sources: []\n")
    assert "data.sources: no data source" in bad("validate", str(r))


def test_validate_names_the_folder_a_missing_gguf_was_looked_for_in(bad, recipe_with_data, tmp_path):
    r = recipe_with_data("model:\n  id: models/mine.gguf\n")
    line = bad("validate", str(r))
    assert "model.id: GGUF file mine.gguf not found" in line and str(tmp_path / "models") in line


def test_validate_finds_a_local_model_folder_that_does_not_exist(bad, recipe_with_data):
    line = bad("validate", str(recipe_with_data("model:\n  id: ./checkpoints/best\n")))
    assert "model.id: './checkpoints/best' is not a local folder" in line


# ------------------------------------------------------------------------------------------- data
def test_a_mapped_column_in_no_row_is_named_with_the_columns_found(bad, tmp_path):
    write(tmp_path, "qa.csv", "question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n")
    r = write(tmp_path, "r.yaml", "name: t\ndata:\n  sources:\n    - path: qa.csv\n      format: prompt_completion\n"
                                  "      columns: {prompt: question, completion: Answer}\n")
    line = bad("validate", str(r))
    assert "data.sources[0].columns.completion: column 'Answer' is in no row of qa.csv" in line
    assert "Columns found: question, answer" in line and "Did you mean 'answer'?" in line


def test_a_mapped_column_in_no_row_without_a_format(bad, tmp_path):
    write(tmp_path, "qa.jsonl", '{"question": "a?", "answer": "b"}\n')
    r = write(tmp_path, "r.yaml", "name: t\ndata:\n  sources:\n    - path: qa.jsonl\n"
                                  "      columns: {prompt: Question, completion: answer}\n")
    line = bad("validate", str(r))
    assert "columns.prompt: column 'Question' is in no row of qa.jsonl" in line and "cannot tell" not in line
    assert "Did you mean 'question'? (column names are case-sensitive)" in line


def test_a_format_whose_column_is_missing_says_how_to_map_it(bad, tmp_path):
    write(tmp_path, "qa.jsonl", '{"question": "a?", "answer": "b"}\n')
    r = write(tmp_path, "r.yaml", "name: t\ndata:\n  sources:\n    - path: qa.jsonl\n      format: alpaca\n")
    line = bad("validate", str(r))
    assert "format 'alpaca' needs a column 'instruction', which no row of qa.jsonl has" in line
    assert "columns: {instruction: <your column>}" in line


@pytest.mark.parametrize(("delimiter", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_semicolon_and_tab_separated_csv_files_are_read(tmp_path, delimiter, name):
    path = write(tmp_path, "qa.csv", f"question{delimiter}answer\nWhat is 2,5 + 1?{delimiter}3,5\nHi?{delimiter}Hello\n")
    loaded = load.read_local(path, where="data.sources[0].path")
    assert [r.record for r in loaded.rows] == [{"question": "What is 2,5 + 1?", "answer": "3,5"},
                                               {"question": "Hi?", "answer": "Hello"}]
    assert loaded.name == f"qa.csv ({name}-separated)" and not loaded.dropped


def test_an_unclosed_quote_drops_one_row_named_by_its_line_and_keeps_the_rest(tmp_path):
    rows = [f"question {i},answer {i}" for i in range(30)]
    rows[8] = '"question 8 opens a quote,answer 8'  # file line 10 (the header is line 1)
    path = write(tmp_path, "qa.csv", "question,answer\n" + "\n".join(rows) + "\n")
    loaded = load.read_local(path, where="data.sources[0].path")
    assert len(loaded.rows) == 29
    assert [(d.origin, d.reason) for d in loaded.dropped] == [("qa.csv:10", "unclosed_quote")]
    assert "opens a cell on line 10 and is never closed" in loaded.dropped[0].detail
    assert loaded.rows[8].origin == "qa.csv:11" and loaded.rows[8].record["answer"] == "answer 9"


def test_an_unclosed_quote_closed_by_a_later_quote_is_still_found(tmp_path):
    text = 'question,answer\n"open,one\nplain,two\n"quoted",three\nlast,four\n'
    loaded = load.read_local(write(tmp_path, "qa.csv", text), where="w")
    assert [d.origin for d in loaded.dropped if d.reason == "unclosed_quote"] == ["qa.csv:2"]
    assert [r.record["answer"] for r in loaded.rows] == ["two", "three", "four"]


def test_a_quoted_cell_over_several_lines_is_one_row(tmp_path):
    text = 'question,answer\n"a question\nover two lines",yes\nnext,"say ""hi"""\n'
    loaded = load.read_local(write(tmp_path, "qa.csv", text), where="w")
    assert not loaded.dropped
    assert [r.record for r in loaded.rows] == [{"question": "a question\nover two lines", "answer": "yes"},
                                               {"question": "next", "answer": 'say "hi"'}]
    assert [r.origin for r in loaded.rows] == ["qa.csv:2", "qa.csv:4"]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "prompt_completion"])
def test_role_aliases_are_mapped_in_every_format_and_counted(fmt):
    turns = [("human", "Hi"), ("bot", "Hello"), ("USER", "Name?"), ("gpt", "Ada")]
    if fmt == "messages":
        rec = {"messages": [{"role": r, "content": c} for r, c in turns]}
    elif fmt == "sharegpt":
        rec = {"conversations": [{"from": r, "value": c} for r, c in turns]}
    else:
        rec = {"prompt": [{"role": r, "content": c} for r, c in turns[:3]],
               "completion": [{"role": "gpt", "content": "Ada"}]}
    example = formats.to_example(rec, fmt, {})
    assert [m["role"] for m in example["messages"]] == ["user", "assistant", "user", "assistant"]
    assert example["roles_mapped"] == {"human->user": 1, "bot->assistant": 1, "USER->user": 1, "gpt->assistant": 1}


def test_an_unknown_role_is_still_dropped_and_lists_the_aliases():
    with pytest.raises(formats.RowError) as info:
        formats.to_example({"messages": [{"role": "narrator", "content": "x"}]}, "messages", {})
    assert info.value.reason == "unknown_role" and "human" in info.value.detail


def test_prepare_reads_a_semicolon_csv_with_aliased_roles_elsewhere(cli, tmp_path, tiny_model_dir):
    """The real prepare on a semicolon-separated .csv with an unclosed quote, beside an OpenAI file whose roles
    are human/bot: the quote costs one row, reported by its line; every aliased row is kept."""
    rows = [f"question number {i} about topic {i * 7};answer number {i} is {i * 13}" for i in range(24)]
    rows[8] = '"question number 8 opens a quote;answer 8'
    write(tmp_path, "qa.csv", "question;answer\n" + "\n".join(rows) + "\n")
    chats = "".join(json.dumps({"messages": [{"role": "HUMAN", "content": f"chat question {i} about {i * 3}"},
                                             {"role": "bot", "content": f"chat reply {i} with {i * 11}"}]}) + "\n"
                    for i in range(6))
    write(tmp_path, "chats.jsonl", chats)
    _, report = prepared_untouched(cli, tmp_path, tiny_model_dir,
                                   "    - path: qa.csv\n      columns: {prompt: question, completion: answer}\n"
                                   "    - path: chats.jsonl\n")
    assert report["dropped"] == {"unclosed_quote": 1}
    assert report["samples"]["unclosed_quote"][0]["origin"] == "qa.csv:10"
    assert report["splits"]["train"] == 23 + 6
    assert report["sources"][0]["name"] == "qa.csv (semicolon-separated)"


def prepared_untouched(cli, tmp_path: Path, model_dir: Path, sources: str) -> tuple[str, dict]:
    """`finetune prepare` on ``sources`` (the YAML lines under data.sources), every row to train; asserts that it
    succeeds and leaves the input files as they were; returns (stdout, prepare's report)."""
    r = write(tmp_path, "r.yaml", f"name: t\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {model_dir}\n"
                                  f"data:\n  sources:\n{sources}  split: {{validation: 0, test: 0}}\n"
                                  "  clean: {near_dedupe: false}\n")
    before = snapshot(tmp_path)
    code, out, err = cli("prepare", str(r))
    assert code == 0, err
    assert snapshot(tmp_path) == before
    return out, json.loads((tmp_path / "runs" / "t" / "prepare" / "report.json").read_text())


def test_a_mapping_chooses_the_format_it_maps_to():
    rows = [{"text": "a note", "q": "Why?", "a": "Because."}]
    assert formats.detect_format(rows, {"prompt": "q", "completion": "a"}, source="s", where="w") == "prompt_completion"
    assert formats.detect_format(rows, {}, source="s", where="w") == "text"
    with pytest.raises(formats.UserError, match=r"w.columns.completion: column 'A' is in no row of s"):
        formats.detect_format(rows, {"prompt": "q", "completion": "A"}, source="s", where="w")


def test_a_stage_names_the_folder_a_missing_gguf_was_looked_for_in(bad, recipe_with_data, tmp_path):
    r = recipe_with_data("model:\n  id: mine.gguf\n")
    line = bad("prepare", str(r))
    assert line.startswith(f"error: {r}: model.id: GGUF file mine.gguf not found (looked in {tmp_path}")
    line = bad("train", str(recipe_with_data()), "model.id=gone/other.gguf")
    assert line.startswith("error: override 'model.id=gone/other.gguf': model.id: GGUF file other.gguf not found")
    assert str(tmp_path / "gone") in line


# ------------------------------------------------------------------- values changed without a word (issue 29)
NUMBER_ROWS = {
    "messages": {"messages": [{"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": 42}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "6 times 7?"}, {"from": "gpt", "value": 42}]},
    "alpaca": {"instruction": "6 times 7?", "output": 42},
    "prompt_completion": {"prompt": "6 times 7?", "completion": 42},
    "kto": {"prompt": "6 times 7?", "completion": 42, "label": True},
    "preference": {"prompt": "6 times 7?", "chosen": 42, "rejected": "41"},
    "text": {"text": 42},
}


@pytest.mark.parametrize("fmt", list(NUMBER_ROWS))
def test_a_number_where_text_belongs_is_read_as_text_and_counted_in_every_format(fmt):
    example = formats.to_example(NUMBER_ROWS[fmt], fmt, {})
    text = example["text"] if fmt == "text" else example["messages"][-1]["content"]
    assert text == "42"
    assert sum(example["numbers_as_text"].values()) == 1, example
    with pytest.raises(formats.RowError, match="should be text, got bool"):
        formats.to_example(json.loads(json.dumps(NUMBER_ROWS[fmt]).replace("42", "true")), fmt, {})


def test_prepare_counts_and_names_numbers_read_as_text_in_jsonl_and_parquet(cli, tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [{"messages": [{"role": "user", "content": f"what is {i} times 7?"},
                           {"role": "assistant", "content": i * 7 if i < 3 else f"it is {i * 7}"}]} for i in range(6)]
    write(tmp_path, "chats.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    pq.write_table(pa.table({"question": [f"what is {i} plus 5?" for i in range(4)], "answer": [i + 5 for i in range(4)]}),
                   tmp_path / "sums.parquet")
    out, report = prepared_untouched(cli, tmp_path, tiny_model_dir,
                                     "    - path: chats.jsonl\n    - path: sums.parquet\n"
                                     "      columns: {prompt: question, completion: answer}\n")
    assert report["numbers_as_text"] == {"messages[*].content": 3, "answer": 4}
    note = next(n for n in report["notes"] if "numbers were read as text" in n)
    assert note.startswith("7 numbers were read as text") and "chats.jsonl:1" in note and "sums.parquet:row 1" in note
    assert "numbers read as text" in out and "7 numbers were read as text" in out
    train = [json.loads(line) for line in (tmp_path / "runs/t/prepare/splits/train.jsonl").read_text().splitlines()]
    assert {"role": "assistant", "content": "5"} in [row["messages"][-1] for row in train]


# ----------------------------------------------------- a format chosen by values, falling back without a word
def test_a_label_column_with_one_bad_value_is_kto_and_the_bad_row_is_named(cli, tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(5)]
    rows[3]["label"] = "maybe"  # data.jsonl:4
    write(tmp_path, "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert formats.detect_format(rows, {}, source="data.jsonl", where="w") == "kto"
    r = write(tmp_path, "r.yaml", f"name: t\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {tiny_model_dir}\n"
                                  "data:\n  sources:\n    - path: data.jsonl\n  split: {validation: 0, test: 0}\n")
    code, out, err = cli("prepare", str(r))
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "t" / "prepare" / "report.json").read_text())
    assert report["sources"][0]["format"] == "kto" and report["row_kind"] == "rated"
    assert report["dropped"] == {"bad_label": 1}
    sample = report["samples"]["bad_label"][0]
    assert sample["origin"] == "data.jsonl:4" and "'maybe': label must be true or false" in sample["detail"]
    assert "data.jsonl:4" in out


def test_a_label_column_of_classes_is_read_as_sft_with_a_note_naming_the_value(cli, tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": "sports"} for i in range(4)]
    write(tmp_path, "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    r = write(tmp_path, "r.yaml", f"name: t\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {tiny_model_dir}\n"
                                  "data:\n  sources:\n    - path: data.jsonl\n  split: {validation: 0, test: 0}\n")
    code, out, err = cli("prepare", str(r))
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "t" / "prepare" / "report.json").read_text())
    assert report["sources"][0]["format"] == "prompt_completion"
    note = "data.sources[0]: column 'label' holds 'sports' (data.jsonl:1), not true/false"
    assert any(n.startswith(note) for n in report["notes"]) and note in out


# ------------------------------------------------------------------------------ errors that blame the wrong thing
def test_a_single_json_object_says_wrap_it_in_a_list(bad, tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    write(tmp_path, "one.json", json.dumps(row, indent=2))
    r = write(tmp_path, "r.yaml", "name: t\ndata:\n  sources:\n    - path: one.json\n")
    line = bad("validate", str(r))
    assert "data.sources[0].path: one.json holds a single JSON object, one row (its 'messages' is a list of 2 turns)" \
        in line and "wrap it in a list" in line and ".jsonl" in line
    write(tmp_path, "one.json", json.dumps({"prompt": "Hi", "completion": "Hello"}))
    assert "holds a single JSON object, one row (with 'prompt', 'completion' as text)" in bad("validate", str(r))
    # the shapes that hold rows are still read
    write(tmp_path, "rows.json", json.dumps({"data": [row, row]}))
    assert len(load.read_local(tmp_path / "rows.json", where="w").rows) == 2
    write(tmp_path, "cols.json", json.dumps({"prompt": ["a", "b"], "completion": ["c", "d"]}))
    assert len(load.read_local(tmp_path / "cols.json", where="w").rows) == 2


@pytest.mark.parametrize(("missing", "present"), [("recipe.yaml", "recipe.yml"), ("recipe.yml", "recipe.yaml")])
def test_a_missing_recipe_names_its_yml_or_yaml_twin(bad, recipe_with_data, tmp_path, missing, present):
    recipe_with_data().rename(tmp_path / present)
    line = bad("validate", str(tmp_path / missing))
    assert f"{tmp_path / missing}: file not found, but {tmp_path / present} exists" in line
    assert "file not found; give the path" in bad("prepare", str(tmp_path / "other.yaml"))


# ---------------------------------------------------------------------- settings that work but should say so
@pytest.mark.parametrize(("encoding", "name"), [("utf-16", "UTF-16 LE"), ("utf-16-le", "UTF-16 LE"),
                                                ("utf-16-be", "UTF-16 BE")])
def test_a_utf16_data_file_says_save_it_as_utf8(bad, recipe_with_data, tmp_path, encoding, name):
    r = recipe_with_data()
    (tmp_path / "data.jsonl").write_bytes(ROWS.encode(encoding))
    line = bad("validate", str(r))
    assert f"data.sources[0].path: data.jsonl is {name} text, not UTF-8; save it as UTF-8" in line
    assert "binary" not in line
    (tmp_path / "data.jsonl").write_bytes(b"\x00\x01\x02binary\x00\x00" * 50)
    assert "looks like a binary file" in bad("validate", str(r))  # a real binary file is still called so


def test_validate_refuses_a_serve_quant_that_export_never_writes(bad, cli, recipe_with_data):
    r = recipe_with_data("export:\n  quantizations: [Q4_K_M]\nserve:\n  quant: Q8_0\n")
    line = bad("validate", str(r))
    assert "serve.quant: Q8_0 is not a type export writes" in line and "export.quantizations ['Q4_K_M']" in line
    assert "F16, Q4_K_M" in line
    assert "serve.quant: q4_k_m is not a type" in bad("validate", str(recipe_with_data(
        "export:\n  quantizations: [Q4_K_M]\nserve:\n  quant: q4_k_m\n")))  # serve looks the name up as written
    for fine in ("export:\n  quantizations: [Q4_K_M]\nserve:\n  quant: F16\n",
                 "export:\n  quantizations: [Q4_K_M]\nserve:\n  quant: Q4_K_M\n", "serve:\n  quant: auto\n"):
        code, _, err = cli("validate", str(recipe_with_data(fine)))
        assert code == 0, (fine, err)


def test_a_system_prompt_that_no_row_takes_is_noted(cli, tmp_path, tiny_model_dir):
    chats = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"q {i}"},
                           {"role": "assistant", "content": f"a {i}"}]} for i in range(4)]
    write(tmp_path, "data.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    text = (f"name: t\nruns_dir: {tmp_path / 'runs'}\nmodel:\n  id: {tiny_model_dir}\ndata:\n  sources:\n"
            "    - path: data.jsonl\n  split: {validation: 0, test: 0}\n  clean: {near_dedupe: false}\n")
    code, out, err = cli("prepare", str(write(tmp_path, "r.yaml", text + "  system_prompt: Be kind.\n")))
    assert code == 0, err
    note = "data.system_prompt is set but was added to 0 rows: every one of the 4 conversations has its own system"
    assert note in out
    assert note in " ".join(json.loads((tmp_path / "runs/t/prepare/report.json").read_text())["notes"])
    chats[0]["messages"].pop(0)  # one row without: the prompt is used, no note
    write(tmp_path, "data.jsonl", "".join(json.dumps(c) + "\n" for c in chats))
    code, out, err = cli("prepare", str(tmp_path / "r.yaml"))
    assert code == 0 and "added to 0 rows" not in out, err
