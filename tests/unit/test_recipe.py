"""The strict recipe schema: unknown keys, wrong types, every error at once, overrides, round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune import recipe


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_exits_2_with_did_you_mean(tmp_path, cli):
    p = write(tmp_path, "name: x\ntrain:\n  learning_rat: 0.1\n  lr: 1e-4\n")
    code, out, err = cli("validate", str(p))
    assert code == 2
    assert "train.learning_rat: unknown key" in err
    assert "did you mean" in err
    # the closest valid key in that section is suggested, with its full dotted path
    p2 = write(tmp_path, "name: x\ntrain:\n  epochz: 1\n", "r2.yaml")
    code, out, err = cli("validate", str(p2))
    assert code == 2 and "did you mean 'train.epochs'?" in err


def test_three_errors_reported_at_once(tmp_path):
    p = write(tmp_path, "name: x\nmodell: foo\ntrain:\n  lr: fast\neval:\n  max_new_tokens: -3\n")
    with pytest.raises(recipe.RecipeError) as info:
        recipe.load(p)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = str(info.value)
    assert "modell: unknown key. did you mean 'model'?" in text
    assert "train.lr:" in text and "'fast'" in text
    assert "eval.max_new_tokens:" in text and "-3" in text
    assert "3 problems" in text


def test_override_with_wrong_type_is_a_clear_error(tmp_path, cli):
    p = write(tmp_path, "name: x\n")
    code, out, err = cli("show", str(p), "train.batch_size=lots")
    assert code == 2
    assert "train.batch_size" in err and "'lots'" in err
    assert "Traceback" not in err


def test_override_of_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "name: x\n")
    with pytest.raises(recipe.RecipeError, match=r"did you mean 'train.lr'"):
        recipe.load(p, ["train.lrr=1e-4"])


def test_overrides_apply_and_parse_types(tmp_path):
    p = write(tmp_path, "name: x\n")
    r = recipe.load(p, ["train.lr=1e-4", "train.lora.r=8", "eval.metrics=[loss, rouge]", "model.revision=main"])
    assert r.train.lr == pytest.approx(1e-4)
    assert r.train.lora.r == 8
    assert r.eval.metrics == ["loss", "rouge"]
    assert r.model.revision == "main"


def test_show_round_trips(tmp_path, cli):
    p = write(tmp_path, "name: x\ndata:\n  sources:\n    - path: data.jsonl\n      columns: {prompt: q, completion: a}\n")
    code, out, err = cli("show", str(p), "train.epochs=3")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["train"]["epochs"] == 3
    again = write(tmp_path, out, "resolved.yaml")
    r2 = recipe.load(again)
    assert r2.to_dict() == resolved


def test_paths_resolve_relative_to_the_recipe(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    p = write(sub, "name: x\ndata:\n  sources:\n    - path: data/rows.jsonl\n")
    r = recipe.load(p)
    assert r.resolve_path(r.data.sources[0].path) == (sub / "data" / "rows.jsonl").resolve()


def test_source_needs_path_or_hub(tmp_path):
    p = write(tmp_path, "name: x\ndata:\n  sources:\n    - split: train\n")
    with pytest.raises(recipe.RecipeError, match=r"data.sources\[0\]: .*exactly one of 'path'"):
        recipe.load(p)


MODEL_RECIPE = ("name: x\ndata:\n  sources:\n    - hub: yahma/alpaca-cleaned\n      format: alpaca\n"
                "      split: train\n      revision: abc\n      max_rows: 100\n")


def test_a_path_override_replaces_the_hub_source_in_one_line(tmp_path):
    """`data.sources.0.path=my.jsonl` on a model recipe (a Hub source) reads the file: hub and the keys that
    described the Hub dataset go, said in one warning; generic keys (max_rows) stay."""
    p = write(tmp_path, MODEL_RECIPE)
    with pytest.warns(UserWarning) as caught:
        r = recipe.load(p, ["data.sources.0.path=my.jsonl"])
    src = r.data.sources[0]
    assert (src.path, src.hub, src.revision, src.format, src.max_rows) == ("my.jsonl", None, None, "auto", 100)
    assert len(caught) == 1
    assert str(caught[0].message) == ("data.sources.0.path replaces the source's hub; dropped hub: yahma/alpaca-cleaned, "
                                      "split: train, revision: abc, format: alpaca (set any that still applies "
                                      "again: data.sources.0.KEY=...)")
    # a key given on the command line as well is kept, in either order
    for overrides in (["data.sources.0.format=alpaca", "data.sources.0.path=my.jsonl"],
                      ["data.sources.0.path=my.jsonl", "data.sources.0.format=alpaca"]):
        with pytest.warns(UserWarning, match=r"dropped hub: yahma/alpaca-cleaned, split: train, revision: abc \(set"):
            assert recipe.load(p, overrides).data.sources[0].format == "alpaca"


def test_a_hub_override_replaces_a_path_source(tmp_path):
    p = write(tmp_path, "name: x\ndata:\n  sources:\n    - path: rows.jsonl\n")
    with pytest.warns(UserWarning, match="data.sources.0.hub replaces the source's path; dropped path: rows.jsonl"):
        r = recipe.load(p, ["data.sources.0.hub=org/rows"])
    assert (r.data.sources[0].hub, r.data.sources[0].path) == ("org/rows", None)


def test_both_path_and_hub_say_how_to_drop_one(tmp_path):
    p = write(tmp_path, "name: x\ndata:\n  sources:\n    - {hub: org/rows, path: rows.jsonl}\n")
    with pytest.raises(recipe.RecipeError, match=r"got both .*data.sources.0.hub=null"):
        recipe.load(p)


def test_the_path_override_through_the_cli_prints_one_warning(repo_root):
    """Run as a user runs it (a child process: pytest's own warning capture would hide the console's)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "finetune", "show",
                           str(repo_root / "recipes" / "models" / "qwen2.5-0.5b-instruct-lora-8gb.yaml"),
                           "data.sources.0.path=my.jsonl"], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "warning: data.sources.0.path replaces the source's hub; dropped hub: yahma/alpaca-cleaned, format: alpaca "
        "(set any that still applies again: data.sources.0.KEY=...)"]
    assert "path: my.jsonl" in proc.stdout and "yahma/alpaca-cleaned" not in proc.stdout


def test_bad_yaml_names_the_line(tmp_path, cli):
    p = write(tmp_path, "name: x\ntrain:\n  lr: [1,\n")
    code, out, err = cli("validate", str(p))
    assert code == 2 and "line" in err and "not valid YAML" in err


def test_missing_file_and_unknown_command(cli, tmp_path):
    code, out, err = cli("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "file not found" in err
    code, out, err = cli("valdate", "x")
    assert code == 2 and "Did you mean 'validate'" in err


def test_every_shipped_recipe_validates(repo_root):
    """Every YAML under recipes/ (recursively, data folders aside) is a valid recipe."""
    files = recipe.recipe_files(repo_root / "recipes")
    assert files, "no recipes shipped"
    problems = []
    for f in files:
        try:
            recipe.load(f)
        except recipe.RecipeError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


def test_each_problem_names_its_line(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  lr: 1e-4\n  epochs: yes\nmodell: foo\n")
    with pytest.raises(recipe.RecipeError) as info:
        recipe.load(p)
    assert sorted(info.value.problems) == sorted([
        "line 4: train.epochs: Input should be a valid number; true/false (also yes/no, on/off) is a boolean, "
        "not a number: write a number (received True)",
        "line 5: modell: unknown key. did you mean 'model'?"])


def test_one_problem_is_one_line_and_an_override_problem_names_the_override(tmp_path):
    p = write(tmp_path, "name: x\n")
    with pytest.raises(recipe.RecipeError) as info:
        recipe.load(p, ["train.lora.r=0"])
    assert str(info.value) == "override 'train.lora.r=0': train.lora.r: Input should be greater than or equal to 1 " \
                              "(received 0)"


def test_yaml_floats_without_a_dot_are_numbers_and_dump_round_trips(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  lr: 2e-5\n  max_grad_norm: 1E+1\n")
    r = recipe.load(p)
    assert r.train.lr == pytest.approx(2e-5) and r.train.max_grad_norm == pytest.approx(10.0)
    again = recipe.load(write(tmp_path, recipe.dump(r), "again.yaml"))
    assert again.train.lr == r.train.lr


def test_with_overrides_keeps_numbers_strict(tmp_path):
    r = recipe.load(write(tmp_path, "name: x\n"))
    assert recipe.with_overrides(r, {"train.lr": 1e-3, "train.lora.r": 8}).train.lora.r == 8
    with pytest.raises(recipe.RecipeError, match=r"override 'train.lora.r=True'"):
        recipe.with_overrides(r, {"train.lora.r": True})


def test_a_tune_range_over_an_optional_integer_key_stays_integer(tmp_path):
    r = recipe.load(write(tmp_path, "name: x\ntune:\n  space:\n    train.max_steps: {low: 10, high: 40}\n"))
    space = r.tune.space["train.max_steps"]
    assert (space.low, space.high) == (10, 40) and isinstance(space.low, int)
    assert recipe.with_overrides(r, {"train.max_steps": space.low}).train.max_steps == 10


def test_dotted_keys_one_getter_setter_and_flattener():
    from finetune.recipe import flat_keys, get_key, set_key

    data = {"train": {"lr": 1e-4, "lora": {"r": 8}}, "data": {"sources": [{"path": "a.jsonl"}]}, "eval": {}}
    set_key(data, "train.lora.r", 16)
    set_key(data, "data.sources.0.weight", 2.0)
    set_key(data, "tune.space", {})
    assert get_key(data, "train.lora.r") == 16 and get_key(data, "train.missing.key") is None
    assert data["data"]["sources"][0] == {"path": "a.jsonl", "weight": 2.0}
    assert flat_keys(data) == {"train.lr": 1e-4, "train.lora.r": 16, "data.sources": [{"path": "a.jsonl", "weight": 2.0}],
                               "eval": {}, "tune.space": {}}


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_gradient_checkpointing_on_off_auto_in_a_recipe_and_an_override(tmp_path, cli, word):
    """YAML 1.1 reads on/off as booleans; a key whose allowed values are text reads them as the text written, in
    the recipe file and on the command line (`train.gradient_checkpointing=on` is what plan suggests)."""
    p = write(tmp_path, f"name: x\ntrain:\n  gradient_checkpointing: {word}\n")
    assert recipe.load(p).train.gradient_checkpointing == word
    assert recipe.load(write(tmp_path, "name: x\n", "plain.yaml"),
                       [f"train.gradient_checkpointing={word}"]).train.gradient_checkpointing == word
    other = {"on": "off", "off": "auto", "auto": "on"}[word]
    assert recipe.load(p, [f"train.gradient_checkpointing={other}"]).train.gradient_checkpointing == other
    code, out, err = cli("show", str(p), f"train.gradient_checkpointing={word}")
    assert code == 0, err
    assert yaml.safe_load(out)["train"]["gradient_checkpointing"] == word
    assert recipe.load(write(tmp_path, out, "shown.yaml")).train.gradient_checkpointing == word  # dump round-trips


def test_boolean_words_are_text_only_where_a_key_takes_text(tmp_path):
    """Every key whose allowed values are strings (a Literal of strings, a str) reads yes/no/true/false/on/off as
    the word; a key that takes a boolean keeps the boolean, and a boolean given to a number is still an error."""
    p = write(tmp_path, "name: yes\ntrain:\n  packing: off\n  eval_every: 5\neval:\n  metrics: [loss]\n")
    r = recipe.load(p)
    assert r.name == "yes" and r.train.packing is False
    r = recipe.load(p, ["name=no", "train.packing=on", "model.revision=off"])
    assert (r.name, r.train.packing, r.model.revision) == ("no", True, "off")
    # the word reaches the schema, which names the allowed values
    for where in ("file", "override"):
        text = "name: x\ntrain:\n  gradient_checkpointing: yes\n" if where == "file" else "name: x\n"
        overrides = [] if where == "file" else ["train.gradient_checkpointing=true"]
        with pytest.raises(recipe.RecipeError) as info:
            recipe.load(write(tmp_path, text, f"{where}.yaml"), overrides)
        word = "yes" if where == "file" else "true"
        assert info.value.problems[-1].endswith(
            f"train.gradient_checkpointing: Input should be 'auto', 'on' or 'off' (received '{word}')"), info.value
    with pytest.raises(recipe.RecipeError) as info:
        recipe.load(write(tmp_path, "name: x\ntrain:\n  batch_size: on\n", "n.yaml"))
    assert "train.batch_size: Input should be a valid integer; true/false (also yes/no, on/off) is a boolean" \
        in str(info.value)
    with pytest.raises(recipe.RecipeError, match=r"override 'train.lora.r=off': train.lora.r: .*is a boolean"):
        recipe.load(p, ["train.lora.r=off"])
    # quoted text stays text, a list item of a text list reads the word, numbers in a file stay as they are
    r = recipe.load(write(tmp_path, 'name: x\ntrain:\n  method: "qlora"\n  lora: {target_modules: [on, q_proj]}\n',
                          "q.yaml"))
    assert r.train.method == "qlora" and r.train.lora.target_modules == ["on", "q_proj"]
    with pytest.raises(recipe.RecipeError, match=r"name: Input should be a valid string; for text, put it in quotes"):
        recipe.load(write(tmp_path, "name: 2024\n", "y.yaml"))
