"""The command line: ``finetune <command> RECIPE [key=value ...]`` (also ``python -m finetune``).

Thin on purpose: a literal table of commands, each a function in its stage's module, imported only
when it runs. Every error the user can fix prints one clear message and exits with code 2; ``--debug``
shows the traceback instead. Third-party warnings and log lines (deprecations, optional-kernel notices)
go to a log file rather than the console, so that a line on the console is ours.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# command -> ("module:function", one-line help), in the order `finetune --help` lists them: the pipeline's stages
# as a run goes through them, then the tools. The function takes argv (list[str]) and returns an exit code.
PIPELINE: dict[str, tuple[str, str]] = {
    "prepare": ("finetune.commands:prepare_command", "Load, clean, dedupe, split and tokenize the recipe's data (with a report)."),
    "train": ("finetune.commands:train_command", "Train LoRA/DoRA/QLoRA or full fine-tuning on the prepared data (--resume)."),
    "eval": ("finetune.commands:eval_command", "Score base vs fine-tuned (and the exported GGUF) on held-out data; write report.html."),
    "export": ("finetune.commands:export_command", "Merge the adapter, convert to GGUF (F16 + quantized), check parity, write Modelfiles."),
    "chat": ("finetune.chat:command", "Chat in the terminal with a model (GGUF directly, or a running server with --url)."),
    "serve": ("serve.server:command", "Serve a model: OpenAI-compatible API and a web chat page (127.0.0.1 by default)."),
    "run": ("finetune.commands:run_command", "Run prepare, train, export and eval in order, skipping stages that are up to date."),
    "push": ("finetune.commands:push_command", "Upload the adapter, merged checkpoint or GGUF files with their model cards to the Hub."),
    "feedback": ("finetune.feedback:command", "Export approved/corrected replies from serve/chat as training data."),
}
TOOLS: dict[str, tuple[str, str]] = {
    "recipes": ("finetune.commands:recipes_command", "List the shipped recipes; `finetune recipes copy NAME [DEST]` copies one."),
    "init": ("finetune.commands:init_command", "Write a recipe from your data file and a model (format, split and method chosen)."),
    "validate": ("finetune.cli:validate_command", "Check one or many recipes; report every problem at once."),
    "show": ("finetune.cli:show_command", "Print the resolved recipe (defaults and overrides applied) as YAML."),
    "plan": ("finetune.commands:plan_command", "Estimate memory and time; say whether it fits your GPU/CPU and what to change."),
    "doctor": ("finetune.doctor:command", "Before training: which family a model is, what each stage will do with it."),
    "tune": ("finetune.commands:tune_command", "Search hyperparameters (tune.space) for the lowest validation loss; write best.yaml."),
}
COMMANDS: dict[str, tuple[str, str]] = {**PIPELINE, **TOOLS}
# Flags every command takes, anywhere on the line (main() reads and removes them before the command parses the rest).
GLOBAL_FLAGS = {"--debug": "show the full traceback on errors",
                "--verbose": "show the libraries' progress bars, warnings and log lines"}

EXIT_USER_ERROR = 2


class CommandParser(argparse.ArgumentParser):
    """argparse with the toolkit's manners: an option it does not know (``--lr 1e-4``) is one line naming the recipe
    override it most likely means (``train.lr=1e-4``), exit code 2; a missing RECIPE says what goes there."""

    def parse_known_args(self, args=None, namespace=None):  # parse_args and parse_intermixed_args come through here
        args = list(sys.argv[1:] if args is None else args)
        unknown = unknown_flag(args, self) if any(a.dest == "overrides" for a in self._actions) else None
        if unknown is not None:
            self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {flag_hint(*unknown)}\n")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        required = "the following arguments are required: "
        missing = message[len(required):].split(", ") if message.startswith(required) else []
        if "RECIPE" in missing:
            others = [m for m in missing if m not in ("RECIPE", "KEY=VALUE")]  # argparse lists an empty nargs="*" too
            overrides = any(a.dest == "overrides" for a in self._actions)
            message = ("RECIPE is required: a recipe YAML file, e.g. recipes/quickstart.yaml (`finetune recipes` lists "
                       "them)" + ("; KEY=VALUE overrides after it are optional" if overrides else "")
                       + (f"; also required: {', '.join(others)}" if others else ""))
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


def unknown_flag(args: list[str], parser: argparse.ArgumentParser) -> tuple[str, str | None] | None:
    """The first ``--name`` (or ``--name=value``) in args that the parser has no option for, with its value (the
    next word when that is not an option or an override); None when every option is known."""
    known = set(parser._option_string_actions)
    for i, word in enumerate(args):
        if word == "--":
            return None
        if not word.startswith("--") or len(word) < 3:
            continue
        name, eq, value = word.partition("=")
        if name in known or any(k.startswith(name) for k in known if k.startswith("--")):  # argparse takes prefixes
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt \
                and not nxt.endswith((".yaml", ".yml")) else None
        return name, value
    return None


def flag_hint(flag: str, value: str | None) -> str:
    """``--lr 1e-4`` -> the override it means, by the recipe schema's own key names (difflib for a near spelling,
    other tools' names such as --learning-rate too)."""
    import difflib

    from finetune.recipe import Recipe
    from finetune.recipe.errors import OTHER_TOOLS_KEYS

    name = flag.lstrip("-").replace("-", "_")
    by_name = schema_keys(Recipe)
    dotted = {k for keys in by_name.values() for k in keys}
    if name in dotted:
        keys = [name]
    elif name.lower() in OTHER_TOOLS_KEYS:
        keys = [OTHER_TOOLS_KEYS[name.lower()]]
    else:
        close = difflib.get_close_matches(name, [*by_name, *OTHER_TOOLS_KEYS], n=1, cutoff=0.6)
        keys = (by_name.get(close[0]) or [OTHER_TOOLS_KEYS[close[0]]]) if close else []
    if not keys:
        return f"{flag} is not an option of this command (see --help); recipe settings are KEY=VALUE overrides after " \
               "the recipe, e.g. train.lr=1e-4 (docs/recipe-reference.md lists every key)"
    shown = value if value is not None else "VALUE"
    overrides = " or ".join(k if "=" in k else f"{k}={shown}" for k in keys)
    return (f"{flag} is not an option; did you mean the recipe override {overrides}? (write it after the recipe, "
            "without dashes)")


def schema_keys(model, prefix: str = "") -> dict[str, list[str]]:
    """Every setting of the recipe schema by its last name, as an override writes it: 'lr' -> ['train.lr'], 'path'
    -> ['data.sources.0.path'] (a list of sections: its first item); and each choice of a setting with a few
    choices by that choice, with its value: 'qlora' -> ['train.method=qlora']."""
    import typing

    from pydantic import BaseModel

    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        dotted, annotation = f"{prefix}{name}", field.annotation
        if typing.get_origin(annotation) is list:
            annotation, dotted = typing.get_args(annotation)[0], f"{dotted}.0"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key, paths in schema_keys(annotation, f"{dotted}.").items():
                out.setdefault(key, []).extend(paths)
            continue
        out.setdefault(name, []).append(dotted)
        for choice in typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ():
            if isinstance(choice, str) and choice not in ("auto", "none", "on", "off"):
                out.setdefault(choice.replace("-", "_"), []).append(f"{dotted}={choice}")
    return out


def recipe_parser(prog: str, description: str, *, many: bool = False) -> argparse.ArgumentParser:
    """An argument parser with RECIPE and key=value overrides, for a stage command to extend."""
    p = CommandParser(prog=f"finetune {prog}", description=description)
    if many:
        p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files or folders (searched recursively)")
    else:
        p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file, e.g. recipes/quickstart.yaml")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="optional dotted overrides, e.g. train.lr=1e-4")
    add_global_flags(p)
    return p


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """--debug and --verbose in a command's --help (main() has already read them wherever they stood)."""
    for flag, help_ in GLOBAL_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=help_)


def load_recipe(ns: argparse.Namespace):
    """The recipe a stage command runs on, with its overrides; a local model path that does not exist is an error
    here, before the stage starts (every stage that loads a recipe this way reads the model)."""
    from finetune import recipe

    r = recipe.load(ns.recipe, ns.overrides)
    problem = _model_path_problem(r.model.id, r.base_dir)
    if problem:
        override = next((o for o in reversed(ns.overrides) if o.partition("=")[0].strip() == "model.id"), None)
        if override is not None:
            raise recipe.RecipeError("override", [f"{recipe.OVERRIDE_PREFIX}{override!r}: {problem}"])
        raise recipe.RecipeError(ns.recipe, [problem])
    return r


def validate_command(argv: list[str]) -> int:
    from finetune import recipe

    ns = recipe_parser("validate", "Validate recipes (every YAML under a folder, recursively): the schema, and "
                       "what needs no model and no network (local data files, their columns, a local model path).",
                       many=True).parse_args(argv)
    files: list[Path] = []
    for item in ns.recipes:
        path = Path(item)
        if path.is_dir():
            from finetune.recipe import recipe_files

            files += recipe_files(path)
        else:
            files.append(path)
    bad = 0
    for f in files:
        try:
            r = recipe.load(f)
            problems = check_inputs(r)
            if problems:
                raise recipe.RecipeError(str(f), problems)
            print(f"ok      {f}  (name: {r.name}, model: {r.model.id})")
        except recipe.RecipeError as exc:
            bad += 1
            print(f"INVALID {exc}", file=sys.stderr)
    print(f"{len(files) - bad} valid, {bad} invalid")
    return EXIT_USER_ERROR if bad else 0


def check_inputs(r) -> list[str]:
    """What `prepare` and the later stages would refuse that needs no model and no network: no data source, a
    local data file that is missing, a folder, unreadable, of an unknown format or without the mapped columns,
    and a local model path (a .gguf file or a folder) that does not exist. Hub ids and Hub datasets are not
    checked (that needs the network)."""
    from finetune import prepare
    from finetune.data import formats
    from finetune.errors import UserError

    problems = []
    if not r.data.sources:
        problems.append("data.sources: no data source; prepare and train need one, e.g. "
                        "data: {sources: [{path: train.jsonl}]}")
    for i, src in enumerate(r.data.sources):
        if src.path is None:
            continue
        try:
            loaded, fmt = prepare.read_source(r, i)
            formats.check_fields_present((row.record for row in loaded.rows), fmt, src.columns, source=loaded.name,
                                         where=f"data.sources[{i}]")
        except UserError as exc:
            problems.append(str(exc))
    produced = {r.export.outtype, *r.export.quantizations}  # the keys of the export's GGUFs, which serve looks up
    # only a serve.quant the recipe sets: left at its default, serve takes the type export wrote (gguf_to_serve)
    if "quant" in r.serve.model_fields_set and r.serve.quant != "auto" and r.serve.quant not in produced:
        problems.append(f"serve.quant: {r.serve.quant} is not a type export writes (export.outtype "
                        f"{r.export.outtype} and export.quantizations {r.export.quantizations}); add {r.serve.quant} to "
                        f"export.quantizations or set serve.quant to one of {', '.join(sorted(produced))}")
    model_problem = _model_path_problem(r.model.id, r.base_dir)
    if model_problem:
        problems.append(model_problem)
    else:
        problems += _model_config_problems(r)
    return problems


def _model_config_problems(r) -> list[str]:
    """What the model's config.json already refuses (``finetune.refusals``), when it is at hand without the
    network (a local folder, or the Hub cache)."""
    from finetune import refusals

    config_file = _cached_config_file(r)
    if config_file is None:
        return []
    return refusals.problems(json.loads(config_file.read_text()), method=r.train.method,
                             adapter_gguf=r.export.adapter_gguf)


def _cached_config_file(r) -> Path | None:
    """The model's config.json when it is on this machine (a local folder, or the Hub cache); None otherwise."""
    from finetune.models import EMBEDDED_MODEL

    if r.model.id == EMBEDDED_MODEL:
        return None
    candidate = Path(r.model.id).expanduser()
    folder = next((p for p in ([candidate] if candidate.is_absolute() else [r.base_dir / candidate, candidate])
                   if (p / "config.json").is_file()), None)
    if folder is not None:
        config_file: Path | None = folder / "config.json"
    elif r.model.id.count("/") == 1 and not candidate.suffix:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(r.model.id, "config.json", revision=r.model.revision)
        config_file = Path(cached) if isinstance(cached, str) else None
    else:
        config_file = None
    return config_file


def _model_path_problem(model_id: str, base_dir: Path) -> str | None:
    """Why model.id names no local model, when it is meant as a path (a .gguf file, or a folder); None otherwise.
    Looks where models.resolve looks: next to the recipe, then from the current folder."""
    from finetune.models import EMBEDDED_MODEL

    if model_id == EMBEDDED_MODEL:
        return None
    candidate = Path(model_id).expanduser()
    places = [candidate] if candidate.is_absolute() else [base_dir / candidate, Path.cwd() / candidate]
    if any(p.exists() for p in places):
        return None
    folders = " and ".join(dict.fromkeys(str(p.parent.resolve()) for p in places))
    if candidate.suffix.lower() == ".gguf":
        return (f"model.id: GGUF file {candidate.name} not found (looked in {folders}); give its path relative to the "
                "recipe's folder, or an absolute path")
    if model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")):
        return None  # a Hub id: checked when it is downloaded
    return (f"model.id: {model_id!r} is not a local folder (looked in {folders}), a .gguf file, a Hub id (org/name) "
            f"or '{EMBEDDED_MODEL}'")


def show_command(argv: list[str]) -> int:
    from finetune import recipe

    ns = recipe_parser("show", "Print the resolved recipe as YAML.").parse_args(argv)
    print(recipe.dump(load_recipe(ns)), end="")
    return 0


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    width = max(len(c) for c in [*COMMANDS, *GLOBAL_FLAGS])
    lines = ["usage: finetune [--debug] [--verbose] <command> RECIPE [KEY=VALUE ...]", ""]
    for title, group in (("the pipeline, in order", PIPELINE), ("tools", TOOLS)):
        lines += [f"{title}:", *(f"  {name:<{width}}  {help_}" for name, (_, help_) in group.items()), ""]
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
    return run_guarded(_resolve(COMMANDS[command][0]), rest, debug=debug)


# Our warnings already printed by this command (main() empties it).
_WARNED: set[str] = set()

# Libraries whose warnings and log lines are meant for their developers, not for our users.
THIRD_PARTY_LOGGERS = ("accelerate", "bitsandbytes", "datasets", "huggingface_hub", "peft", "torch", "torchao", "trl")
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


def run_guarded(fn: Callable[[list[str]], int], argv: list[str], *, debug: bool) -> int:
    """Run a command; user errors -> one message and exit 2 (traceback only with --debug)."""
    from finetune.errors import UserError
    from finetune.recipe import RecipeError

    try:
        return int(fn(argv) or 0)
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
