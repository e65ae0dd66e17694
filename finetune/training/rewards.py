"""GRPO's rewards: the built-ins named in a recipe (``train.rewards``) and the user's own functions.

Every reward has TRL's signature, ``f(prompts, completions, **columns) -> list[float | None]``, so a reward
function written for TRL's GRPOTrainer works unchanged: ``prompts`` are the rendered prompt texts, ``completions``
the generated texts (``conversational: true``: ``[{"role": "assistant", "content": text}]`` each), and the columns
are ``reference`` (the row's reference answer: the last assistant turn, the completion or the output; None on a
prompt-only row), ``completion_ids`` (token ids) and, as TRL passes a dataset's other columns, every column of the
data rows that their format does not read (``answer``, ``solution``...; prepare keeps them as ``extra_columns``), one
value per completion (None where a row lacks it). None means "no opinion" (TRL: NaN, left out of the sums). The
built-ins read only their own arguments.

The built-ins score 1 or 0, except ``length`` (0 up to ``max_tokens``, then -(n - max_tokens) / max_tokens):

- exact_match: the completion equals the reference, both trimmed (eval's exact match).
- numeric_match: the last number of the completion equals the reference's last number (within ``tolerance``).
- regex: the trimmed completion matches ``pattern`` whole.
- json_schema: the completion is JSON (and valid under ``json_schema`` when one is given).
- tool_call_match: the completion's tool calls, read with the chat template's syntax, equal the reference's
  (names and JSON-equal arguments, any order; eval's tool_call_match).

A reward that is missing, raises, returns the wrong number of values or something that is not a number stops
training with one line naming it (and the row, where one is at fault): ``UserError``, exit 2.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

NEEDS_REFERENCE = ("exact_match", "numeric_match", "tool_call_match")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass(frozen=True)
class Reward:
    """One configured reward: its label (the log's key), weight, function and whether it reads the reference."""

    label: str
    weight: float
    fn: Callable[..., list[Any]]
    needs_reference: bool = False
    conversational: bool = False


# ------------------------------------------------------------------------------------------ built-ins
def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text or "")
    return float(found[-1].replace(",", "")) if found else None


def exact_match(prompts, completions, reference, **_) -> list[float]:
    return [float(c.strip() == r.strip()) for c, r in zip(completions, reference, strict=True)]


def numeric_match(prompts, completions, reference, *, tolerance: float = 1e-6, **_) -> list[float]:
    out = []
    for c, r in zip(completions, reference, strict=True):
        got, want = _last_number(c), _last_number(r)
        out.append(float(got is not None and want is not None and abs(got - want) <= tolerance))
    return out


def regex(prompts, completions, *, pattern: str, **_) -> list[float]:
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def json_schema(prompts, completions, *, schema: dict[str, Any] | None = None, **_) -> list[float]:
    validator = None
    if schema is not None:
        import jsonschema

        validator = jsonschema.Draft202012Validator(schema)
    out = []
    for c in completions:
        try:
            value = json.loads(c)
        except ValueError:
            out.append(0.0)
            continue
        out.append(float(validator is None or validator.is_valid(value)))
    return out


def tool_call_match(prompts, completions, reference, *, template: str = "", **_) -> list[float]:
    from finetune.data.toolcalls import parse_reply
    from finetune.metrics import calls_match

    return [float(calls_match(parse_reply(c, template).tool_calls, parse_reply(r, template).tool_calls))
            for c, r in zip(completions, reference, strict=True)]


def length(prompts, completions, completion_ids, *, max_tokens: int, **_) -> list[float]:
    return [-max(0, len(ids) - max_tokens) / max_tokens for ids in completion_ids]


BUILT_IN = {"exact_match": exact_match, "numeric_match": numeric_match, "regex": regex, "json_schema": json_schema,
            "tool_call_match": tool_call_match, "length": length}


# ------------------------------------------------------------------------------------------ building
def build(configs: Sequence[Any], base_dir: Path, *, template: str = "") -> list[Reward]:
    """The recipe's rewards (``train.rewards`` entries), each ready to call; a user function that cannot be found
    is named now, before training starts."""
    rewards = []
    for k, cfg in enumerate(configs):
        where = f"train.rewards.{k}"
        if cfg.function is not None:
            rewards.append(Reward(cfg.function, cfg.weight, _user_function(cfg.function, base_dir, where),
                                  conversational=cfg.conversational))
            continue
        settings: dict[str, Any] = {}
        if cfg.name == "regex":
            try:
                re.compile(cfg.pattern)
            except re.error as exc:
                raise UserError(f"{where}.pattern: {cfg.pattern!r} is not a regular expression ({exc}).") from None
            settings["pattern"] = cfg.pattern
        elif cfg.name == "json_schema":
            settings["schema"] = _schema(cfg.json_schema, base_dir, where)
        elif cfg.name == "numeric_match":
            settings["tolerance"] = cfg.tolerance
        elif cfg.name == "length":
            settings["max_tokens"] = cfg.max_tokens
        elif cfg.name == "tool_call_match":
            settings["template"] = template
        fn = BUILT_IN[cfg.name]
        rewards.append(Reward(cfg.name, cfg.weight, _bind(fn, settings), needs_reference=cfg.name in NEEDS_REFERENCE))
    labels = [r.label for r in rewards]
    if len(set(labels)) != len(labels):
        raise UserError(f"train.rewards: {labels} names a reward twice; give each once (weights add up otherwise).")
    return rewards


def _bind(fn, settings: dict[str, Any]):
    def bound(prompts, completions, **columns):  # a data column named like a setting does not replace it
        return fn(prompts, completions, **{k: v for k, v in columns.items() if k not in settings}, **settings)
    return bound


def _user_function(spec: str, base_dir: Path, where: str) -> Callable[..., list[Any]]:
    module_name, _, attr = spec.partition(":")
    folder = str(Path(base_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # modules beside the recipe import like installed ones
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(f"{where}.function: {spec}: no module {exc.name!r} (looked beside the recipe, in {folder}, and "
                        "in the installed packages); put {module_name}.py beside the recipe or fix the name.") from None
    except Exception as exc:  # the user's module failed while importing
        raise UserError(f"{where}.function: {spec}: importing {module_name} raised {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        have = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:8]
        raise UserError(f"{where}.function: {spec}: {module_name} has no function {attr!r} (it has {have}).")
    return fn


def _schema(value: dict[str, Any] | str | None, base_dir: Path, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        import jsonschema
    except ImportError:
        raise UserError(f"{where}.json_schema: checking a schema needs the jsonschema package: "
                        "pip install jsonschema (or leave json_schema unset: any valid JSON scores 1).") from None
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else Path(base_dir) / value
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{where}.json_schema: {path}: cannot read a JSON schema ({exc}).") from None
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as exc:
        raise UserError(f"{where}.json_schema: not a valid JSON Schema: {exc.message}") from None
    return value


# ------------------------------------------------------------------------------------------ scoring
def score(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str], references: Sequence[Any],
          completion_ids: Sequence[Sequence[int]], rows: Sequence[str],
          columns: Sequence[dict[str, Any]] | None = None):
    """(completions, rewards) float tensor of each reward's values (NaN: None), checked. ``rows``: a name for
    each completion's data row ("training row 12"), for errors; ``columns``: each completion's data row's other
    columns (prepare's ``extra_columns``), passed by name as TRL does."""
    import torch

    n = len(completions)
    rows_columns = list(columns) if columns is not None else [{}] * n
    # every row's columns, in order of appearance (prepare refuses those named like the arguments below)
    names = dict.fromkeys(k for c in rows_columns for k in c if k not in ("prompts", "completions"))
    columns = {k: [c.get(k) for c in rows_columns] for k in names}
    columns.update({"reference": list(references), "completion_ids": [list(c) for c in completion_ids]})
    out = torch.full((n, len(rewards)), float("nan"))
    for j, r in enumerate(rewards):
        if r.needs_reference:
            missing = next((k for k, ref in enumerate(references) if ref is None), None)
            if missing is not None:
                raise UserError(f"train.rewards: {r.label} compares with the reference, but {rows[missing]} has none "
                                "(a prompt-only row); give every row a reference answer (its reply) or use a reward "
                                "that needs none (regex, json_schema, length, your function: it receives the rows' "
                                "other columns, e.g. answer=).")
        shown = [[{"role": "assistant", "content": c}] for c in completions] if r.conversational else list(completions)
        try:
            values = r.fn(prompts=list(prompts), completions=shown, **columns)
        except Exception as exc:  # the user's function: named with what it raised
            raise UserError(f"train.rewards: {r.label} raised {type(exc).__name__}: {exc} (scoring "
                            f"{_rows_named(rows)}).") from None
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"train.rewards: {r.label} returned {got} for {n} completions; return one float (or None) "
                            "per completion, in order.")
        for k, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise UserError(f"train.rewards: {r.label} returned {v!r} for completion {k} of {rows[k]}; a reward "
                                "is a finite float (or None for no opinion).")
            out[k, j] = float(v)
    return out


def _rows_named(rows: Sequence[str]) -> str:
    unique = list(dict.fromkeys(rows))
    return ", ".join(unique[:4]) + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
