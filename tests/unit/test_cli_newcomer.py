"""A newcomer's first hour on the command line: the help in pipeline order, what a command needs, flags taken
where the usage shows them, and a one-line did-you-mean for a flag that is really a recipe setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import run_cli

from finetune import cli, cli_parsers

REPO = Path(__file__).resolve().parent.parent.parent
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")



def test_help_lists_the_pipeline_in_order_then_the_tools(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    lines = out.splitlines()
    first = [line.split()[0] for line in lines if line.startswith("  ") and line.split()]
    pipeline = ["prepare", "train", "eval", "export", "chat", "serve"]
    assert first[:len(pipeline)] == pipeline
    tools_at = lines.index("tools:")
    for tool in ("validate", "plan", "doctor", "tune"):
        assert any(line.split()[:1] == [tool] for line in lines[tools_at:]), tool
    assert "--debug" in out and "--verbose" in out and set(first) >= set(cli.COMMANDS)


def test_a_command_without_its_recipe_says_recipe_is_required_and_overrides_optional(capsys):
    code, _, err = run_cli(capsys, "train")
    assert code == 2
    assert "RECIPE is required" in err and "overrides after it are optional" in err
    assert "usage: finetune train" in err and "RECIPE [KEY=VALUE ...]" in err  # the usage shows which is which


@pytest.mark.parametrize("argv", [["--debug", "validate", QUICKSTART], ["validate", "--debug", QUICKSTART],
                                  ["validate", QUICKSTART, "--debug"], ["--verbose", "validate", QUICKSTART],
                                  ["validate", "--verbose", QUICKSTART]])
def test_debug_and_verbose_are_taken_before_or_after_the_command(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert out.startswith("ok ") and "1 valid, 0 invalid" in out


@pytest.mark.parametrize(("flags", "override"), [
    (["--lr", "1e-4"], "train.lr=1e-4"),             # the schema's own name
    (["--learning-rate=3e-4"], "train.lr=3e-4"),     # another tool's name for it
    (["--epoch", "3"], "train.epochs=3"),            # a near spelling (difflib)
    (["--max-steps", "20"], "train.max_steps=20"),   # dashes for underscores
    (["--warmup-ratio"], "train.warmup_ratio=VALUE"),  # no value given
    (["--path", "mine.jsonl"], "data.sources.0.path=mine.jsonl"),  # a key inside a list of sections
    (["--qlora"], "train.method=qlora"),             # one of a setting's choices
])
def test_an_unknown_flag_names_the_override_it_means(capsys, flags, override):
    code, out, err = run_cli(capsys, "show", QUICKSTART, *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert f"did you mean the recipe override {override}?" in err and err.startswith("error: finetune show: ")


def test_train_with_an_lr_flag_exits_2_before_training(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", QUICKSTART, f"runs_dir={tmp_path}", "--lr", "1e-4")
    assert code == 2 and out == "" and "train.lr=1e-4" in err
    assert not any(tmp_path.iterdir())


def test_an_unknown_flag_that_is_no_setting_points_to_help(capsys):
    code, _, err = run_cli(capsys, "prepare", QUICKSTART, "--zzzz-qqqq")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--zzzz-qqqq is not an option of this command (see --help)" in err


def test_known_flags_and_their_prefixes_still_parse():
    parser = cli_parsers.recipe_parser("train", "t")
    parser.add_argument("--resume", action="store_true")
    assert cli_parsers.unknown_flag(["R", "--resume", "train.lr=1e-4"], parser) is None
    assert cli_parsers.unknown_flag(["R", "--res"], parser) is None  # argparse takes an unambiguous prefix
    assert cli_parsers.unknown_flag(["R", "--", "--lr"], parser) is None
    assert cli_parsers.unknown_flag(["R", "--lr", "train.lr=1"], parser) == ("--lr", None)


# ------------------------------------------------------------------------------------------ finetune recipes
def test_recipes_lists_every_shipped_recipe_with_its_first_header_sentence(capsys, monkeypatch):
    from finetune import starter

    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: one line per recipe
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    shipped = sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix()
                     for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)
    assert sorted(r.name for r in starter.shipped_recipes()) == shipped
    names = [line.split()[0] for line in out.splitlines()[2:] if line.strip() and not line.startswith(" ")]
    assert [n for n in names if n in shipped] == [r.name for r in starter.shipped_recipes()]
    about = {r.name: r.about for r in starter.shipped_recipes()}
    assert about["quickstart"] == ("The quickstart: the embedded SmolLM2-135M-Instruct learns a skill it lacks, "
                                   "offline, on a laptop CPU.")
    assert all(about.values())


def test_recipes_copy_writes_once_and_says_which_data_to_copy(capsys, tmp_path, monkeypatch):
    import shlex
    import subprocess

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart")
    assert code == 0, err
    copy = tmp_path / "quickstart.yaml"
    assert copy.read_text() == (REPO / "recipes" / "quickstart.yaml").read_text()
    fix = next(line for line in out.splitlines() if "copy that too:" in line).split("copy that too: ", 1)[1]
    assert "recipes/data/quickstart.jsonl" in fix
    code, _, err = run_cli(capsys, "validate", str(copy))
    assert code == 2 and "quickstart.jsonl" in err  # before the data is copied
    subprocess.run(fix, shell=True, check=True, cwd=tmp_path)  # the printed mkdir -p ... && cp ...
    assert shlex.split(fix)[0] == "mkdir"
    code, out, err = run_cli(capsys, "validate", str(copy))
    assert code == 0 and "1 valid, 0 invalid" in out, err

    copy.write_text("mine\n")
    code, _, err = run_cli(capsys, "recipes", "copy", "quickstart", str(copy))
    assert code == 2 and "already exists and is left as it is" in err and copy.read_text() == "mine\n"


def test_recipes_copy_into_a_folder_and_unknown_names(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "recipes", "copy", "models/qwen3-1.7b-lora-8gb", f"{tmp_path}/mine/")
    assert code == 0 and (tmp_path / "mine" / "qwen3-1.7b-lora-8gb.yaml").is_file()
    assert "copy that too" not in out  # a Hub dataset: nothing local to copy
    code, _, err = run_cli(capsys, "recipes", "copy", "quikstart", str(tmp_path / "x.yaml"))
    assert code == 2 and "did you mean quickstart?" in err and not (tmp_path / "x.yaml").exists()
    code, _, err = run_cli(capsys, "recipes", "quickstart")
    assert code == 2 and "finetune recipes copy quickstart [DEST]" in err


# --------------------------------------------------------------------------------------------- finetune init
def _qa_csv(path: Path, rows: int) -> Path:
    path.write_text("question,answer\n" + "".join(f"What is {i} plus 1?,{i + 1}\n" for i in range(rows)))
    return path


def test_init_writes_a_recipe_that_validates_and_never_overwrites(capsys, tmp_path, tiny_model_dir):
    import yaml

    data = _qa_csv(tmp_path / "my data.csv", 60)
    out = tmp_path / "recipes" / "mine.yaml"
    code, printed, err = run_cli(capsys, "init", str(data), "--model", str(tiny_model_dir), "-o", str(out))
    assert code == 0, err
    assert "60 rows, prompt_completion format" in printed and "passes `finetune validate`" in printed
    written = yaml.safe_load(out.read_text())
    source = written["data"]["sources"][0]
    assert source["format"] == "prompt_completion"
    assert source["columns"] == {"prompt": "question", "completion": "answer"}  # the CSV's own column names
    assert written["data"]["split"] == {"validation": 0.2, "test": 0.2} and written["train"]["method"] == "lora"
    assert out.read_text().startswith("# mine: ") and "written by `finetune init`" in out.read_text()
    code, printed, err = run_cli(capsys, "validate", str(out))
    assert code == 0 and "1 valid, 0 invalid" in printed, err

    before = out.read_text()
    code, _, err = run_cli(capsys, "init", str(data), "--model", str(tiny_model_dir), "-o", str(out))
    assert code == 2 and "already exists and is left as it is" in err and out.read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["mine.yaml"]  # no temporary file left behind


def test_init_refuses_what_it_cannot_read_in_one_line(capsys, tmp_path, tiny_model_dir):
    odd = tmp_path / "odd.csv"
    odd.write_text("colour,size\n" + "red,3\n" * 30)
    code, _, err = run_cli(capsys, "init", str(odd), "--model", str(tiny_model_dir), "-o", str(tmp_path / "r.yaml"))
    assert code == 2 and "cannot tell the row format" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "init", str(_qa_csv(tmp_path / "few.csv", 5)), "--model", str(tiny_model_dir),
                           "-o", str(tmp_path / "r.yaml"))
    assert code == 2 and "5 rows: too few" in err and not (tmp_path / "r.yaml").exists()


def test_init_sizes_the_recipe_for_a_card_by_the_planner(monkeypatch, tmp_path):
    """Offline, the planner reads the model's bundled config snapshot; the recipe init writes carries the planner's
    changes, so that `finetune plan` says it fits the card."""
    import json

    from finetune import plan, recipe, starter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a"}]}) + "\n"
                            for i in range(100)))
    out = tmp_path / "chats.yaml"
    # a 7B model's bf16 weights alone (~14 GiB) leave no room on a 16 GB card: the planner's way is QLoRA
    written = starter.init_recipe(str(data), "Qwen/Qwen2.5-7B-Instruct", check=lambda r: [], out=str(out),
                                  gpu_gb=16)
    assert written.format == "messages" and "sized by `finetune plan` for a GPU with 16 GB" in written.why
    r = recipe.load(out)
    assert r.card_gb == 16 and r.data.sources[0].path == "chats.jsonl" and r.train.method == "qlora"
    planned = plan.run(r, gpu_gb=16)
    assert planned["results"][0]["fits"] and "snapshot" in planned["config_source"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(100)))
    written = starter.init_recipe(str(pairs), "Qwen/Qwen2.5-1.5B-Instruct", check=lambda r: [],
                                  out=str(tmp_path / "pairs.yaml"), gpu_gb=24)
    assert written.format == "preference" and recipe.load(tmp_path / "pairs.yaml").train.objective == "dpo"


# ------------------------------------------------------------------------------------------ plan and doctor offline
SNAPSHOTS = REPO / "tests" / "fixtures" / "configs"


def test_the_hub_clients_retry_lines_are_kept_off_the_console_inside_quiet_hub(capfd):
    from huggingface_hub.utils import logging as hub_logging

    from finetune.console import quiet_hub

    http = hub_logging.get_logger("huggingface_hub.utils._http")
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_warning()  # as with --verbose (an earlier in-process command may have quieted it)
    try:
        with quiet_hub():
            http.warning("Retrying in 1s [Retry 1/5].")
        assert "Retrying" not in capfd.readouterr().err
        # outside, the library's level is back as it was (its own handler prints the line again; where that handler
        # writes depends on what earlier in-process commands did to it, so the level is what is checked)
        assert http.isEnabledFor(hub_logging.WARNING)
    finally:
        hub_logging.set_verbosity(level)


def test_plan_offline_reads_the_bundled_snapshot_and_says_so(capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    code = cli.main(["plan", "recipes/models/qwen3-1.7b-lora-8gb.yaml", "--gpu-gb", "8"])
    out, err = capfd.readouterr()
    assert code == 0 and err == ""
    assert out.splitlines()[0].endswith("config from the snapshot tests/fixtures/configs/Qwen--Qwen3-1.7B.json, as "
                                        "the Hub's copy could not be read; --config PATH to give another)")


def test_doctor_offline_names_the_snapshot_and_reads_it_with_config(capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    code = cli.main(["doctor", "Qwen/Qwen3-1.7B", "--revision", "no-such-revision"])  # never in a cache
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.strip().endswith("--config tests/fixtures/configs/Qwen--Qwen3-1.7B.json (the config.json snapshot "
                                "shipped with finetune)")
    code = cli.main(["doctor", "--config", "tests/fixtures/configs/Qwen--Qwen3-1.7B.json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "Qwen3ForCausalLM (model_type qwen3)" in out and "1.72B" in out and "not checked: --config" in out


def _tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A small GGUF written with the gguf package: a header like a converted chat model's, two tensors."""
    import gguf as gguf_lib
    import numpy as np

    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_name("tiny chat")
    writer.add_context_length(4096)
    writer.add_token_list(["<s>", "<|im_start|>", "<|im_end|>", "hello", "world"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((5, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_doctor_reads_a_gguf_from_its_header_without_converting_it(capsys, monkeypatch, tmp_path):
    import json

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "doctor", str(_tiny_gguf(tmp_path / "tiny.gguf")), "--json")
    assert code == 0, err
    report = json.loads(out)
    findings = {(f["stage"], f["check"]): f["finding"] for f in report["findings"]}
    assert report["model"] == "tiny chat" and findings[("model", "architecture")].startswith("llama (GGUF v3")
    assert findings[("model", "parameters")] == "0.0M in 2 tensors (1 F32, 1 F16)"
    assert findings[("prepare", "BOS")] == "'<|im_start|>'" and findings[("serve", "end of turn (EOS)")] == "'<|im_end|>'"
    assert findings[("model", "context")] == "4096 tokens" and "converted once" in findings[("train", "weights")]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing converted, nothing cached
    code, out, _ = run_cli(capsys, "doctor", str(_tiny_gguf(tmp_path / "odd.gguf", arch="no-such-arch")))
    assert code == 2 and "transformers cannot read a no-such-arch GGUF back into a checkpoint" in out


# ------------------------------------------------------------------------------------------------ the eval report
def _report_result(examples_n: int) -> tuple[dict, list[dict]]:
    """A result with a torch-scored pair of columns and a GGUF column (as eval writes them: the GGUF's time is its
    'seconds'), and examples where each column misses now and then."""
    models = {"base": {"model": "b", "exact_match": 0.2, "answer_words": 9.0, "generation_seconds": 3.5, "loss": 2.0},
              "finetuned": {"model": "f", "exact_match": 0.9, "answer_words": 4.0, "generation_seconds": 2.5,
                            "loss": 1.0},
              "gguf-Q8_0": {"model": "g", "exact_match": 0.8, "answer_words": 3.0, "runtime": "llama.cpp",
                            "seconds": 1.25}}
    result = {"models": models, "examples": examples_n, "split": "test", "verdict": {}, "gguf": {"status": "scored"},
              "generation": {"greedy": True, "temperature": 0.0, "max_new_tokens": 32}}
    examples = []
    for i in range(examples_n):
        wrong = {"base": i % 4 == 0, "finetuned": i == 7, "gguf-Q8_0": i == 11}
        examples.append({"id": f"ex{i}", "prompt": f"prompt {i}", "reference": str(i),
                         "answers": {n: (f"no {i}" if miss else str(i)) if n != "base" or i % 3 else f"{i} !"
                                     for n, miss in wrong.items()},
                         "scores": {n: {"exact_match": 0.0 if miss else 1.0} for n, miss in wrong.items()}})
    return result, examples


def test_the_report_lists_every_example_some_column_got_wrong_then_disagreements():
    from finetune import eval_report

    result, examples = _report_result(60)
    wrong = [x["id"] for x in examples if any(not s["exact_match"] for s in x["scores"].values())]
    assert len(wrong) > eval_report.SAMPLE_SIZE  # more misses than a sample of 12 has room for
    picked = eval_report.pick_sample(examples)
    ids = [x["id"] for x in picked]
    assert ids[:len(wrong)] == wrong  # every miss, any column's, first and in file order
    rest = picked[len(wrong):]
    assert len(rest) == eval_report.SAMPLE_SIZE
    differ = [len(set(x["answers"].values())) > 1 for x in rest]
    assert differ == sorted(differ, reverse=True) and differ[0]  # then disagreements, then agreements
    page = eval_report.render_html(result, examples, title="t", loss_png=None, metrics_png=None)
    assert f"all {len(wrong)} that some model got wrong" in page
    assert all(f"<pre>prompt {i}</pre>" in page for i in (7, 11, 48))  # the fine-tuned and the GGUF column's misses


def test_best_only_where_higher_or_lower_is_better_and_every_column_has_a_generation_time():
    from finetune import eval_report

    result, _ = _report_result(20)
    rows = {r["label"]: r["cells"] for r in eval_report.metric_rows(result)}
    assert [c["best"] for c in rows["exact match"]] == [False, True, False]
    assert [c["best"] for c in rows["loss"]] == [False, True, False]
    assert not any(c["best"] for c in rows["answer length (words)"])  # shorter is not better, nor longer
    times = next(cells for label, cells in rows.items() if label.startswith("generation seconds"))
    assert [c["text"] for c in times] == ["3.50", "2.50", "1.25"] and not any(c["best"] for c in times)


# ------------------------------------------------------------------------------------------------- --verbose
def test_the_libraries_are_quiet_unless_verbose(capsys, monkeypatch):
    """The switches each library reads at import are set by the CLI before a command runs, and only without
    --verbose (the libraries' own output in a fresh process: tests/integration/test_console_noise.py)."""
    import os

    from finetune.console import QUIET_LIBRARIES

    switches = [pair for pairs in QUIET_LIBRARIES.values() for pair in pairs]
    for variable, _ in switches:
        monkeypatch.delenv(variable, raising=False)
    assert run_cli(capsys, "--verbose", "validate", QUICKSTART)[0] == 0
    assert not any(variable in os.environ for variable, _ in switches)
    assert run_cli(capsys, "validate", QUICKSTART)[0] == 0
    assert all(os.environ.get(variable) == value for variable, value in switches)
