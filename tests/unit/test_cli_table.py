"""The command table: each command's parser and its function side by side, the parsing beside it, and the stage and
tool modules called with plain typed arguments."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import run_cli

from finetune import cli, cli_parsers, commands

REPO = Path(__file__).resolve().parent.parent.parent
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")



@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_pairs_a_parser_of_its_own_with_a_function_of_the_command_layer(name):
    command = cli.COMMANDS[name]
    parser = command.parser()
    assert isinstance(parser, cli_parsers.Parser)
    assert parser.prog == f"finetune {name}"
    assert "--debug" in parser.format_help() or name == "feedback"  # feedback's sit on its subcommands
    assert callable(command.run) and command.run.__module__ == "finetune.commands"
    assert getattr(commands, command.run.__name__) is command.run


def test_only_the_command_layer_builds_argument_parsers():
    outside = []
    for path in sorted([*(REPO / "finetune").rglob("*.py"), *(REPO / "serve").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel in ("finetune/cli.py", "finetune/cli_parsers.py", "finetune/commands.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                outside.append(rel)
    assert outside == []


def test_the_help_imports_no_stage_and_no_torch():
    script = ("import sys; from finetune.cli import main; main(['--help']); "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'serve') or m in "
              "('finetune.chat', 'finetune.doctor', 'finetune.feedback', 'finetune.prepare', 'finetune.train', "
              "'finetune.evaluate', 'finetune.export', 'finetune.recipe')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.splitlines()[-1] == "[]"


def test_doctor_gets_plain_arguments(capsys, monkeypatch):
    from finetune import doctor

    seen = {}
    monkeypatch.setattr(doctor, "check", lambda model, **kw: seen.update(model=model, **kw) or 2)
    code, _, _ = run_cli(capsys, "doctor", "--config", "c.json", "org/name", "--json", "--trust-remote-code")
    assert code == 2
    assert seen == {"model": "org/name", "config": Path("c.json"), "revision": None, "trust_remote_code": True,
                    "as_json": True}


def test_chat_gets_plain_arguments_with_options_between_the_overrides(capsys, monkeypatch):
    from finetune import chat

    seen = {}
    monkeypatch.setattr(chat, "run", lambda target, overrides, **kw: seen.update(target=target, overrides=overrides,
                                                                                 **kw) or 0)
    code, _, _ = run_cli(capsys, "chat", "m.gguf", "serve.n_ctx=512", "--temperature", "0", "serve.quant=F16",
                         "--system", "be brief")
    assert code == 0
    assert seen == {"target": "m.gguf", "overrides": ["serve.n_ctx=512", "serve.quant=F16"], "url": None,
                    "api_key": None, "system": "be brief", "temperature": 0.0, "max_tokens": 256}


def test_serve_gets_plain_arguments(capsys, monkeypatch):
    from serve import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda target, overrides, **kw: seen.update(target=target,
                                                                                     overrides=overrides, **kw) or 0)
    code, _, _ = run_cli(capsys, "serve", QUICKSTART, "--port", "9000", "serve.workers=2", "--log-level", "info")
    assert code == 0
    assert seen == {"target": QUICKSTART, "overrides": ["serve.workers=2"], "host": None, "port": 9000,
                    "api_key": None, "store": None, "chat_template": None, "log_level": "info"}


def test_feedback_takes_overrides_after_the_options_and_refuses_a_stray_word(capsys, monkeypatch):
    from finetune import feedback

    seen = {}
    monkeypatch.setattr(feedback, "export_file", lambda target, overrides, out, **kw: seen.update(
        target=target, overrides=overrides, out=out, **kw) or 0)
    monkeypatch.setattr(feedback, "report_stats", lambda target, overrides: seen.update(stats=target) or 0)
    code, _, _ = run_cli(capsys, "feedback", "export", "r.yaml", "-o", "f.jsonl", "runs_dir=/tmp/x", "--as",
                         "preferences")
    assert code == 0
    assert seen == {"target": "r.yaml", "overrides": ["runs_dir=/tmp/x"], "out": "f.jsonl", "train_on": None,
                    "kind": "preferences"}
    assert run_cli(capsys, "feedback", "stats", "store")[0] == 0 and seen["stats"] == "store"
    code, _, err = run_cli(capsys, "feedback", "export", "r.yaml", "-o", "f.jsonl", "stray")
    assert code == 2 and "error: finetune feedback: unrecognized arguments: stray" in err


def test_a_stage_command_parses_before_it_imports_its_stage(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "finetune.tune", None)  # importing it would fail
    code, out, err = run_cli(capsys, "tune", QUICKSTART, "--fresh", "--lr", "1e-4")
    assert code == 2 and out == "" and "did you mean the recipe override train.lr=1e-4?" in err
