"""Helpers for the CLI tests: the real command line, run in-process."""

from __future__ import annotations


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The real CLI in-process, argparse's own exits included: (exit code, stdout, stderr)."""
    from finetune import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
