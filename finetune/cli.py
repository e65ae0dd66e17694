"""The command line: ``finetune <command> RECIPE [key=value ...]`` (also ``python -m finetune``).

Thin on purpose: a literal table pairing each command with its parser (``finetune.cli_parsers``) and its function
(``finetune.commands``), which turns the parsed line into a call of its stage, imported only when it runs. Every
error the user can fix prints one clear message and exits with code 2; ``--debug`` shows the traceback instead.
Third-party warnings and log lines (deprecations, optional-kernel notices) go to a log file rather than the console,
so that a line on the console is ours.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from finetune import cli_parsers as parsers
from finetune import commands
from finetune.cli_parsers import EXIT_USER_ERROR, GLOBAL_FLAGS


class Command(NamedTuple):
    parser: Callable[[], parsers.Parser]  # builds the command's parser (parser.parse(argv) reads its line)
    run: Callable[[argparse.Namespace], int]  # the parsed line -> the stage's call; returns the exit code
    help: str  # its line in `finetune --help`


# The commands in the order `finetune --help` lists them: the pipeline's stages as a run goes through them, then the
# tools.
PIPELINE: dict[str, Command] = {
    "prepare": Command(parsers.prepare_parser, commands.prepare_command,
                       "Load, clean, dedupe, split and tokenize the recipe's data (with a report)."),
    "train": Command(parsers.train_parser, commands.train_command,
                     "Train LoRA/DoRA/QLoRA or full fine-tuning on the prepared data (--resume)."),
    "eval": Command(parsers.eval_parser, commands.eval_command,
                    "Score base vs fine-tuned (and the exported GGUF) on held-out data; write report.html."),
    "export": Command(parsers.export_parser, commands.export_command,
                      "Merge the adapter, convert to GGUF (F16 + quantized), check parity, write Modelfiles."),
    "chat": Command(parsers.chat_parser, commands.chat_command,
                    "Chat in the terminal with a model (GGUF directly, or a running server with --url)."),
    "serve": Command(parsers.serve_parser, commands.serve_command,
                     "Serve a model: OpenAI-compatible API and a web chat page (127.0.0.1 by default)."),
    "run": Command(parsers.run_parser, commands.run_command,
                   "Run prepare, train, export and eval in order, skipping stages that are up to date."),
    "push": Command(parsers.push_parser, commands.push_command,
                    "Upload the adapter, merged checkpoint or GGUF files with their model cards to the Hub."),
    "feedback": Command(parsers.feedback_parser, commands.feedback_command,
                        "Export approved/corrected replies from serve/chat as training data."),
}
TOOLS: dict[str, Command] = {
    "recipes": Command(parsers.recipes_parser, commands.recipes_command,
                       "List the shipped recipes; `finetune recipes copy NAME [DEST]` copies one."),
    "init": Command(parsers.init_parser, commands.init_command,
                    "Write a recipe from your data file and a model (format, split and method chosen)."),
    "validate": Command(parsers.validate_parser, commands.validate_command,
                        "Check one or many recipes; report every problem at once."),
    "show": Command(parsers.show_parser, commands.show_command,
                    "Print the resolved recipe (defaults and overrides applied) as YAML."),
    "plan": Command(parsers.plan_parser, commands.plan_command,
                    "Estimate memory and time; say whether it fits your GPU/CPU and what to change."),
    "doctor": Command(parsers.doctor_parser, commands.doctor_command,
                      "Before training: which family a model is, what each stage will do with it."),
    "tune": Command(parsers.tune_parser, commands.tune_command,
                    "Search hyperparameters (tune.space) for the lowest validation loss; write best.yaml."),
}
COMMANDS: dict[str, Command] = {**PIPELINE, **TOOLS}


def usage() -> str:
    width = max(len(c) for c in [*COMMANDS, *GLOBAL_FLAGS])
    lines = ["usage: finetune [--debug] [--verbose] <command> RECIPE [KEY=VALUE ...]", ""]
    for title, group in (("the pipeline, in order", PIPELINE), ("tools", TOOLS)):
        lines += [f"{title}:", *(f"  {name:<{width}}  {c.help}" for name, c in group.items()), ""]
    lines += [f"  {flag:<{width}}  {help_}" for flag, help_ in GLOBAL_FLAGS.items()]
    lines += ["", "Start with `finetune run recipes/quickstart.yaml`. Run `finetune <command> --help` for a command's "
              "options."]
    return "\n".join(lines)


def split_global_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    """argv without --debug and --verbose (before a ``--``), and which of them were given."""
    end = argv.index("--") if "--" in argv else len(argv)
    given = {a for a in argv[:end] if a in GLOBAL_FLAGS}
    return [a for i, a in enumerate(argv) if i >= end or a not in GLOBAL_FLAGS], given


def main(argv: list[str] | None = None) -> int:
    argv, given = split_global_flags(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"finetune {version('finetune')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"finetune: unknown command '{command}'.{hint}\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    debug = "--debug" in given or os.environ.get("FINETUNE_DEBUG") == "1"
    loud = debug or "--verbose" in given  # the libraries' own output on the console, as they print it
    _WARNED.clear()
    if not loud:
        send_third_party_noise_to_log()
    from finetune.console import library_output

    library_output(verbose=loud)
    return run_guarded(COMMANDS[command], rest, debug=debug)


# Our warnings already printed by this command (main() empties it).
_WARNED: set[str] = set()

# Libraries whose warnings and log lines are meant for their developers, not for our users.
THIRD_PARTY_LOGGERS = ("accelerate", "bitsandbytes", "datasets", "huggingface_hub", "kernels", "peft", "torch", "torchao",
                      "trl")
OUR_PACKAGES = tuple(str(Path(__file__).resolve().parent.parent / name) for name in ("finetune", "serve"))


def third_party_log() -> Path:
    from finetune.models import cache_root

    return cache_root() / "logs" / "third-party.log"


def send_third_party_noise_to_log() -> None:
    """Third-party warnings (FutureWarning, DeprecationWarning, UserWarnings raised inside a library) and the
    log lines of THIRD_PARTY_LOGGERS (bitsandbytes' "Failed to load CPU gemm_4bit_forward ... No module named
    'kernels'") go to third_party_log() instead of the console. Our own warnings still print. Set once per
    process, before any command module is imported; `--verbose`, `--debug` (or FINETUNE_DEBUG=1) leave everything on
    the console."""
    log = logging.getLogger("finetune.third_party")
    if log.handlers:
        return
    from logging.handlers import RotatingFileHandler

    path = third_party_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # no writable cache folder: leave the console as it is rather than lose the lines
    handler = RotatingFileHandler(path, maxBytes=2_000_000, backupCount=1, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    for name in THIRD_PARTY_LOGGERS:
        library = logging.getLogger(name)
        library.addHandler(handler)
        library.propagate = False
    # transformers, huggingface_hub and datasets print through handlers of their own: console.library_output
    # sets their levels.

    def show(message, category, filename, lineno, file=None, line=None):
        ours = str(filename).startswith(OUR_PACKAGES)
        if ours and not issubclass(category, (DeprecationWarning, FutureWarning)):
            # one line in our words, once per command: the same warning from several stages is one warning
            if str(message) not in _WARNED:
                _WARNED.add(str(message))
                print(f"warning: {message}", file=sys.stderr)
        else:
            log.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)

    warnings.showwarning = show


def run_guarded(command: Command, argv: list[str], *, debug: bool) -> int:
    """Parse the command's line and run it; user errors -> one message and exit 2 (traceback only with --debug)."""
    from finetune.errors import UserError
    from finetune.recipe import RecipeError

    try:
        return int(command.run(command.parser().parse(argv)) or 0)
    except (UserError, RecipeError) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `finetune recipes | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except Exception as exc:  # an unexpected failure: still no traceback unless asked for
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> Any:
    sys.exit(main())
