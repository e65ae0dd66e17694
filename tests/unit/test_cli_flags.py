"""Every command's manners with a flag it does not know: one line on stderr with the did-you-mean (a flag of that
command spelt nearly so, or the recipe override where the command takes overrides), exit code 2, read before the
command's stage is imported; a missing argument is argparse's one line after the usage."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import run_cli

from finetune import cli, cli_parsers

REPO = Path(__file__).resolve().parent.parent.parent
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")

# What a command may not import before its line is parsed: the stages, the server and the libraries they load.
HEAVY = ("torch", "transformers", "peft", "datasets", "llama_cpp", "fastapi", "uvicorn", "serve.server", "serve.app",
         "finetune.prepare", "finetune.train", "finetune.evaluate", "finetune.export", "finetune.tune", "finetune.plan",
         "finetune.starter")



# A misspelt flag of each tool command, and what it is taken for.
MISSPELT = [
    (["serve", QUICKSTART, "--prot", "8000"], "finetune serve", "--prot is not an option; did you mean --port?"),
    (["chat", QUICKSTART, "--temprature", "0"], "finetune chat",
     "--temprature is not an option; did you mean --temperature?"),
    (["chat", "--url", "http://127.0.0.1:8765", "--api_key", "k"], "finetune chat",
     "--api_key is not an option; did you mean --api-key?"),
    (["doctor", "org/name", "--jsn"], "finetune doctor", "--jsn is not an option; did you mean --json?"),
    (["doctor", "--trust-remote", "org/name", "--revison", "main"], "finetune doctor",
     "--revison is not an option; did you mean --revision?"),
    (["feedback", "export", "r.yaml", "-o", "f.jsonl", "--trian-on", "all"], "finetune feedback export",
     "--trian-on is not an option; did you mean --train-on?"),
    (["feedback", "stats", "r.yaml", "--debgu"], "finetune feedback stats",
     "--debgu is not an option; did you mean --debug?"),
    (["validate", QUICKSTART, "--verbsoe"], "finetune validate",
     "--verbsoe is not an option; did you mean --verbose?"),
    (["recipes", "--hlep"], "finetune recipes", "--hlep is not an option; did you mean --help?"),
    (["init", "data.csv", "--modle", "org/name"], "finetune init", "--modle is not an option; did you mean --model?"),
    (["run", QUICKSTART, "--forse"], "finetune run", "--forse is not an option; did you mean --force?"),
    (["train", QUICKSTART, "--resme"], "finetune train", "--resme is not an option; did you mean --resume?"),
    (["plan", QUICKSTART, "--gpu_gb", "8"], "finetune plan", "--gpu_gb is not an option; did you mean --gpu-gb?"),
    (["plan", QUICKSTART, "--gpu", "8"], "finetune plan", "--gpu is ambiguous; did you mean --gpu-gb or --gpus?"),
]


@pytest.mark.parametrize(("argv", "prog", "hint"), MISSPELT, ids=[" ".join(m[0][:1] + m[0][2:]) for m in MISSPELT])
def test_a_misspelt_flag_is_one_line_naming_the_flag_before_anything_is_imported(capsys, monkeypatch, argv, prog,
                                                                                 hint):
    for name in HEAVY:  # importing any of them would fail the command (the CLI quiets the two left if imported)
        if name not in ("transformers", "datasets"):
            monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {prog}: {hint}"]


def test_the_tool_commands_parse_in_a_fresh_process_without_importing_a_stage():
    cases = [["serve", QUICKSTART, "--prot", "8000"], ["chat", QUICKSTART, "--temprature", "0"],
             ["doctor", "org/name", "--jsn"], ["feedback", "export", "r.yaml", "-o", "f.jsonl", "--trian-on", "all"],
             ["validate", QUICKSTART, "--strikt"]]
    script = ("import contextlib, io, json, sys\nfrom finetune.cli import main\ncodes = []\n"
              f"for argv in {cases!r}:\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        try:\n            codes.append(main(argv))\n"
              "        except SystemExit as exc:\n            codes.append(exc.code)\n"
              "    codes.append(len(err.getvalue().splitlines()))\n"
              f"print(json.dumps([codes, sorted(m for m in sys.modules if m in {HEAVY!r} or "
              "m.split('.')[0] in ('torch', 'transformers', 'serve', 'llama_cpp'))]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    codes, imported = json.loads(out.splitlines()[-1])
    assert codes == [2, 1] * len(cases)  # exit 2 and one line on stderr, each
    assert imported == []


def test_a_flag_that_names_a_recipe_key_gets_the_override_where_the_command_takes_overrides(capsys):
    code, _, err = run_cli(capsys, "serve", QUICKSTART, "--workers", "2")
    assert code == 2 and err.splitlines() == [
        "error: finetune serve: --workers is not an option; did you mean the recipe override serve.workers=2? "
        "(write it after the recipe, without dashes)"]
    code, _, err = run_cli(capsys, "chat", QUICKSTART, "-lr", "1e-4")
    assert code == 2 and "did you mean the recipe override train.lr=1e-4?" in err
    # validate and doctor take no overrides: a flag that is nothing of theirs points to --help
    code, _, err = run_cli(capsys, "validate", QUICKSTART, "--lr", "1e-4")
    assert code == 2
    assert err.splitlines() == ["error: finetune validate: --lr is not an option of this command (see --help)"]
    code, _, err = run_cli(capsys, "doctor", "org/name", "-x")
    assert code == 2
    assert err.splitlines() == ["error: finetune doctor: -x is not an option of this command (see --help)"]


def test_values_and_words_after_a_double_dash_are_not_flags():
    parser = cli_parsers.chat_parser()
    assert cli_parsers.unknown_flag(["--temperature", "-0.5", "--system", "-be brief-"], parser) is None
    assert cli_parsers.unknown_flag(["--temp", "0", "--max", "9", "--url=http://x"], parser) is None  # prefixes
    assert cli_parsers.unknown_flag(["m.gguf", "--", "--prot"], parser) is None
    assert cli_parsers.unknown_flag(["--prot=80"], parser) == ("--prot", "80")
    feedback = cli_parsers.feedback_parser()
    assert cli_parsers.own_words(["--x", "export", "r.yaml", "--y"], feedback) == ["--x"]


@pytest.mark.parametrize(("argv", "message"), [
    (["serve"], "error: finetune serve: the following arguments are required: RECIPE|MODEL.gguf"),
    (["feedback"], "error: finetune feedback: the following arguments are required: {export,stats}"),
    (["feedback", "export", "r.yaml"], "error: finetune feedback export: the following arguments are required: "
                                       "-o/--out"),
    (["init", "data.csv"], "error: finetune init: the following arguments are required: --model"),
    (["validate"], "error: finetune validate: RECIPE is required: a recipe YAML file, e.g. recipes/quickstart.yaml "
                   "(`finetune recipes` lists them)"),
])
def test_a_missing_argument_is_the_usage_and_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"usage: finetune {argv[0]}") and lines[-1] == message
    assert not any(line.startswith("error") for line in lines[:-1])


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_the_manners(name):
    parser = cli.COMMANDS[name].parser()
    assert isinstance(parser, cli_parsers.CommandParser)
    subcommands = [sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   for sub in a.choices.values()]
    assert all(isinstance(sub, cli_parsers.CommandParser) for sub in subcommands)
    assert bool(subcommands) == (name == "feedback")
