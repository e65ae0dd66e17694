"""Every command's argument parser, beside the command table (``finetune.cli``), which pairs each with its function.

A builder here returns the parser of one command; ``parser.parse(argv)`` reads the command line the way that command
does (options between the positionals too, for some). Every command has the toolkit's manners (``CommandParser``):
an option it does not know is one line naming the option of that command it most likely means or, for a command that
takes recipe overrides, the override (``--lr 1e-4`` -> ``train.lr=1e-4``), exit code 2. Values a builder needs from a
stage (its choices, its own help text) are imported when it is built, so that ``finetune --help`` imports no stage.
``load_recipe`` reads a parsed RECIPE and its overrides back as the recipe.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Flags every command takes, anywhere on the line (main() reads and removes them before the command parses the rest).
GLOBAL_FLAGS = {"--debug": "show the full traceback on errors",
                "--verbose": "show the libraries' progress bars, warnings and log lines"}

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse that knows how its command reads the line: ``intermixed`` takes options between and after the
    positionals too (``RECIPE --force KEY=VALUE``)."""

    def __init__(self, *args, intermixed: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed

    def parse(self, argv: list[str]) -> argparse.Namespace:
        return self.parse_intermixed_args(argv) if self.intermixed else self.parse_args(argv)


class CommandParser(Parser):
    """argparse with the toolkit's manners: an option it does not know is one line naming what it most likely means,
    exit code 2: a flag of the command spelt nearly so (``--prot`` -> ``--port``) or, where the command takes recipe
    overrides, the override (``--lr 1e-4`` -> ``train.lr=1e-4``); a missing argument is argparse's one line after the
    usage, and a missing RECIPE says what goes there."""

    def parse_known_args(self, args=None, namespace=None):  # parse_args and parse_intermixed_args come through here
        args = list(sys.argv[1:] if args is None else args)
        unknown = unknown_flag(own_words(args, self), self)
        if unknown is not None:
            self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {flag_hint(*unknown, parser=self)}\n")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        required = "the following arguments are required: "
        if message.startswith(required):
            message = required_message(message[len(required):].split(", "), self)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")


def takes_overrides(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == "overrides" for a in parser._actions)


def own_words(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """The words of args that are the parser's own: with subcommands, those before the subcommand's name (the
    subcommand's parser reads the rest, with these same manners)."""
    names = {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}
    return next((args[:i] for i, word in enumerate(args) if word in names), args) if names else args


def required_message(missing: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's "the following arguments are required: ..." as one line, without the positionals that may be
    empty (argparse lists an empty nargs="*" too) and with a subcommand named by its choices; a missing RECIPE says
    what goes there."""
    optional = {a.metavar or a.dest for a in parser._actions if not a.option_strings and a.nargs in ("?", "*")}
    named = {a.dest: "{" + ",".join(a.choices) + "}" for a in parser._actions
             if isinstance(a, argparse._SubParsersAction) and a.metavar is None and a.dest}
    missing = [named.get(m, m) for m in missing if m not in optional] or missing
    if "RECIPE" not in missing:
        return "the following arguments are required: " + ", ".join(missing)
    others = [m for m in missing if m != "RECIPE"]
    return ("RECIPE is required: a recipe YAML file, e.g. recipes/quickstart.yaml (`finetune recipes` lists them)"
            + ("; KEY=VALUE overrides after it are optional" if takes_overrides(parser) else "")
            + (f"; also required: {', '.join(others)}" if others else ""))


NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # a value, as argparse reads it (our parsers have no such option)


def unknown_flag(args: list[str], parser: argparse.ArgumentParser) -> tuple[str, str | None] | None:
    """The first option in args (``--name``, ``--name=value``, ``-x``) that the parser has no option for, or that
    abbreviates several of its options, with its value (the next word when that is not an option or an override);
    None when every option is known. Words after ``--`` are positionals."""
    known = set(parser._option_string_actions)
    for i, word in enumerate(args):
        if word == "--":
            return None
        if not word.startswith("-") or word == "-" or " " in word or NEGATIVE_NUMBER.match(word):
            continue  # a positional or a value, as argparse reads it
        name, eq, value = word.partition("=")
        if word.startswith("--"):
            if name in known or len(abbreviated(name, parser)) == 1:  # argparse takes an unambiguous prefix
                continue
        elif word[:2] in known:  # -o FILE, -oFILE
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt \
                and not nxt.endswith((".yaml", ".yml")) else None
        return name, value
    return None


def abbreviated(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """The parser's long options that ``--name`` abbreviates (argparse's prefix matching)."""
    return sorted(o for o in parser._option_string_actions if o.startswith("--") and o.startswith(name))


def flag_hint(flag: str, value: str | None, parser: argparse.ArgumentParser) -> str:
    """What an option the parser does not know most likely means, as the rest of one error line. In order: the
    options it abbreviates; the command's option spelt with underscores or another case; the recipe override of that
    name (``--lr 1e-4`` -> ``train.lr=1e-4``, other tools' names such as --learning-rate too), where the command takes
    overrides; the command's option spelt nearly so (difflib: ``--prot`` -> ``--port``); the override spelt nearly
    so."""
    import difflib

    overrides = takes_overrides(parser)
    options = sorted(o for o in parser._option_string_actions if o.startswith("--"))
    if flag.startswith("--") and len(abbreviated(flag, parser)) > 1:
        return f"{flag} is ambiguous; did you mean {' or '.join(abbreviated(flag, parser))}?"
    spelt = {o[2:].lower().replace("_", "-"): o for o in options}
    name = flag.lstrip("-").lower().replace("_", "-")
    if len(flag) > 2 and name in spelt:
        return f"{flag} is not an option; did you mean {spelt[name]}?"
    keys = recipe_keys(flag, close=False) if overrides else []
    if not keys and len(name) > 1:
        near = difflib.get_close_matches(name, list(spelt), n=1, cutoff=0.6)
        if near:
            return f"{flag} is not an option; did you mean {spelt[near[0]]}?"
    keys = keys or (recipe_keys(flag, close=True) if overrides else [])
    if not keys:
        return f"{flag} is not an option of this command (see --help)" + (
            "; recipe settings are KEY=VALUE overrides after the recipe, e.g. train.lr=1e-4 "
            "(docs/recipe-reference.md lists every key)" if overrides else "")
    shown = value if value is not None else "VALUE"
    written = " or ".join(k if "=" in k else f"{k}={shown}" for k in keys)
    return (f"{flag} is not an option; did you mean the recipe override {written}? (write it after the recipe, "
            "without dashes)")


def recipe_keys(flag: str, *, close: bool) -> list[str]:
    """The recipe overrides a flag names by the recipe schema's own key names (a dotted key, its last name, one of
    a setting's choices) or another tool's name for one; with close, by a near spelling of those too (difflib)."""
    import difflib

    from finetune.recipe import Recipe
    from finetune.recipe.errors import OTHER_TOOLS_KEYS

    name = flag.lstrip("-").replace("-", "_")
    by_name = schema_keys(Recipe)
    if name in {k for keys in by_name.values() for k in keys}:
        return [name]
    if name.lower() in OTHER_TOOLS_KEYS:
        return [OTHER_TOOLS_KEYS[name.lower()]]
    if name in by_name:
        return by_name[name]
    near = difflib.get_close_matches(name, [*by_name, *OTHER_TOOLS_KEYS], n=1, cutoff=0.6) if close else []
    return (by_name.get(near[0]) or [OTHER_TOOLS_KEYS[near[0]]]) if near else []


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


def recipe_parser(prog: str, description: str, *, many: bool = False, intermixed: bool = False) -> CommandParser:
    """An argument parser with RECIPE and key=value overrides, for a stage command to extend."""
    p = CommandParser(prog=f"finetune {prog}", description=description, intermixed=intermixed)
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


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug alone in a tool's --help, as the tools that print their own usage show it."""
    parser.add_argument("--debug", action="store_true", help=GLOBAL_FLAGS["--debug"])


# ------------------------------------------------------------------------------------------- the RECIPE argument
def load_recipe(ns: argparse.Namespace):
    """The recipe a stage command runs on, with its overrides; a local model path that does not exist is an error
    here, before the stage starts (every stage that loads a recipe this way reads the model)."""
    from finetune import recipe

    r = recipe.load(ns.recipe, ns.overrides)
    problem = model_path_problem(r.model.id, r.base_dir)
    if problem:
        override = next((o for o in reversed(ns.overrides) if o.partition("=")[0].strip() == "model.id"), None)
        if override is not None:
            raise recipe.RecipeError("override", [f"{recipe.OVERRIDE_PREFIX}{override!r}: {problem}"])
        raise recipe.RecipeError(ns.recipe, [problem])
    return r


def model_path_problem(model_id: str, base_dir: Path) -> str | None:
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


# ------------------------------------------------------------------------------------------- the pipeline
def prepare_parser() -> Parser:
    p = recipe_parser("prepare", "Load, clean, split and tokenize the recipe's data into runs/<name>/prepare/.")
    p.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    return p


def train_parser() -> Parser:
    p = recipe_parser("train", "Train the recipe's model on the prepared data (LoRA, DoRA, QLoRA or full). "
                               "Several processes: `torchrun --nproc_per_node N -m finetune train RECIPE` or "
                               "`accelerate launch -m finetune train RECIPE`.")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint (an interrupted run also resumes by itself "
                        "when its settings are unchanged)")
    return p


def eval_parser() -> Parser:
    return recipe_parser("eval", "Score the base and the fine-tuned model (and the exported GGUF) on held-out "
                         "examples; write metrics.json and report.html under runs/<name>/eval/.")


def export_parser() -> Parser:
    return recipe_parser("export", "Merge the trained adapter, convert to GGUF (F16 + quantizations), check parity, "
                                   "write Ollama Modelfiles. Run after `finetune train`.")


def chat_parser() -> Parser:
    from finetune import chat

    p = CommandParser(prog="finetune chat", description=chat.__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=chat.HELP, intermixed=True)
    p.add_argument("target", nargs="?", metavar="RECIPE|MODEL.gguf",
                   help="a recipe (chats with its exported serve.quant GGUF) or a .gguf file; not needed with --url")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. serve.quant=Q4_K_M")
    p.add_argument("--url", help="talk to a running server instead, e.g. http://127.0.0.1:8765")
    p.add_argument("--api-key", help="the server's API key (or set FINETUNE_API_KEY)")
    p.add_argument("--system", help="system prompt for the conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = always the most likely token (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    add_debug_flag(p)
    return p


def serve_parser() -> Parser:
    p = CommandParser(
        prog="finetune serve",
        description="Serve a fine-tuned model: OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models), /health, and a web chat page at /.", intermixed=True,
    )
    p.add_argument("target", metavar="RECIPE|MODEL.gguf", help="a recipe (serves its export's serve.quant GGUF) or a .gguf")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. serve.n_ctx=4096 serve.workers=2")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1). Non-loopback needs an API key")
    p.add_argument("--port", type=int, help="port (default serve.port, 8765)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set FINETUNE_API_KEY; safer than a flag)")
    p.add_argument("--store", help="folder for conversations and feedback (default runs/<name>/serve or next to the GGUF)")
    p.add_argument("--chat-template", help="a .jinja chat template, only for a GGUF that lacks one")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="console log level: warning (default) shows one line per 4xx/5xx answer and per worker "
                   "crash; info also shows every request")
    add_debug_flag(p)
    return p


def run_parser() -> Parser:
    from finetune.run.freshness import STAGE_NAMES

    p = recipe_parser("run", "Run prepare, train, export and eval in order; stages that are up to date are skipped.",
                      intermixed=True)
    p.add_argument("--force", action="store_true", help="run every stage even if it is up to date")
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, help="run from this stage on (earlier ones if stale)")
    p.add_argument("--no-answer", action="store_true", help="skip the final sample answer from the GGUF")
    return p


def push_parser() -> Parser:
    from finetune import hub

    p = recipe_parser("push", "Upload a run's adapter, merged checkpoint or GGUF files (each with its model card) to "
                              "a Hugging Face model repository. Needs a token: `huggingface-cli login` or HF_TOKEN.",
                      intermixed=True)
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository (created if missing)")
    p.add_argument("--what", choices=hub.WHAT, default="gguf",
                   help="adapter: train's adapter; merged: export's merged checkpoint; gguf (default): export's GGUF "
                        "files, Modelfiles and card; all: adapter/ and merged/ as folders, the GGUF files at the root")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded where, and upload nothing")
    return p


class FeedbackParser(CommandParser):
    """``finetune feedback``'s parser, and its subcommands': recipe overrides may also come after the options
    (``-o out.jsonl runs_dir=...``); any other word left over is an error."""

    def parse(self, argv: list[str]) -> argparse.Namespace:
        ns, extra = self.parse_known_args(argv)  # overrides may come after -o
        bad = [a for a in extra if a.startswith("-") or "=" not in a]
        if bad:
            self.error(f"unrecognized arguments: {' '.join(bad)}")
        ns.overrides = ns.overrides + extra
        return ns


def feedback_parser() -> Parser:
    from finetune.feedback import TRAIN_ON_CHOICES

    p = FeedbackParser(
        prog="finetune feedback",
        description="Turn feedback collected by `finetune serve` / `finetune chat` into training data.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("export", help="write approved and corrected replies as {messages: [...]} JSONL rows")
    stats = sub.add_parser("stats", help="count stored exchanges, ratings and corrections")
    for sp in (exp, stats):
        sp.add_argument("target", metavar="RECIPE|DIR|MODEL.gguf",
                        help="the recipe (reads runs/<name>/serve/), the served .gguf, or the store folder")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. runs_dir=/tmp/runs")
        add_debug_flag(sp)
    exp.add_argument("-o", "--out", required=True, help="output JSONL file (add it to data.sources to train on it)")
    exp.add_argument("--train-on", choices=TRAIN_ON_CHOICES,
                     help="the data.train_on of the recipe that will train the file (default: the recipe's when a "
                     "recipe is given, else assistant). With assistant or all, conversations whose earlier model "
                     "replies are not approved are left out, since those replies would be trained on too")
    exp.add_argument("--as", dest="kind", choices=("sft", "preferences"), default="sft",
                     help="sft (default): approved and corrected replies as {messages} rows; preferences: DPO/ORPO "
                     "pairs from corrections to -o, KTO rows from ratings and corrections to <out>.kto.jsonl "
                     "(train them with train.objective dpo/orpo/simpo or kto)")
    return p


# ------------------------------------------------------------------------------------------------ tools
def recipes_parser() -> Parser:
    p = CommandParser(prog="finetune recipes", description="List the shipped recipes, or copy one to start from.")
    p.add_argument("action", nargs="?", default="list", metavar="list|copy", help="list (default) or copy")
    p.add_argument("name", nargs="?", metavar="NAME", help="copy: the recipe, as listed (e.g. tasks/my-data)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="copy: a new .yaml file or a folder (default: here)")
    add_global_flags(p)
    return p


def init_parser() -> Parser:
    p = CommandParser(prog="finetune init", description="Write a recipe for your data file and a model: the format "
                      "detected from the columns, a train/validation/test split, and the training method "
                      "`finetune plan` says fits this machine (or --gpu-gb). An existing file is never replaced.")
    p.add_argument("data", metavar="DATA", help="your data file (.jsonl .json .csv .tsv .parquet .txt)")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH",
                   help="a Hub id (org/name), a local model folder, a .gguf file, or smollm2-135m-instruct")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                   help="choose the method for a GPU with N GB instead of this machine")
    p.add_argument("-o", "--output", default=None, metavar="RECIPE",
                   help="the recipe file to write (default: <data name>.yaml here)")
    add_global_flags(p)
    return p


def validate_parser() -> Parser:
    return recipe_parser("validate", "Validate recipes (every YAML under a folder, recursively): the schema, and "
                         "what needs no model and no network (local data files, their columns, a local model path).",
                         many=True)


def show_parser() -> Parser:
    return recipe_parser("show", "Print the resolved recipe as YAML.")


def plan_parser() -> Parser:
    p = recipe_parser("plan", "Estimate training memory and time for a recipe; say whether it fits and what to change.")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                   help="plan for a GPU with N GB (e.g. 8, 12, 16, 24) instead of the detected device")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan N such GPUs: memory per GPU with the model sharded (FSDP2) and the launch command; "
                        "if it does not fit, try more GPUs or fsdp_activation_checkpointing")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="the model's config.json (or a folder with it); default: from the model folder or the Hub")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def doctor_parser() -> Parser:
    from finetune import doctor

    p = CommandParser(prog="finetune doctor", description=doctor.__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a Hub id, a local model folder, a .gguf file, or a recipe (its model.id)")
    p.add_argument("--config", type=Path, default=None, metavar="CONFIG.json",
                   help="the model's config.json (or a folder with it): no Hub, no weights; the tokenizer is checked "
                        "when its files are beside it")
    p.add_argument("--revision", help="a Hub revision")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    add_global_flags(p)
    return p


def tune_parser() -> Parser:
    p = recipe_parser("tune", "Search hyperparameters (tune.space) for the lowest validation loss; write "
                      "runs/<name>/tune/results.csv and best.yaml. Running it again continues the study.")
    p.add_argument("--fresh", action="store_true", help="delete the stored study and its trials and start over")
    return p
