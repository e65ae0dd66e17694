"""What a recipe problem says: ``RecipeError`` (every problem at once, one line each), and the line built for each
validation error: where it came from (the file's line, or the override that set it), the key, what was received,
and the fix: our name for another tool's key (``learning_rate`` -> ``train.lr``), the same key in another section,
a close spelling, or the valid keys; for a wrong type, what to write instead (strict types: no silent coercion).
The schema itself is ``finetune.recipe``; these functions take it as an argument."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError


class RecipeError(Exception):
    """A recipe (or an override) is invalid. One problem is one line; several are listed one per line.

    A problem that an override caused starts with ``override 'key=value':`` and is shown without the file.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            only = problems[0]
            message = only if only.startswith(OVERRIDE_PREFIX) else f"{source}: {only}"
        else:
            lines = [f"{source}: {len(problems)} problems"]
            lines += [f"  - {p}" for p in problems]
            message = "\n".join(lines)
        super().__init__(message)


OVERRIDE_PREFIX = "override "


# Names other tools use (transformers' TrainingArguments, PEFT, TRL, axolotl) -> our dotted key.
OTHER_TOOLS_KEYS = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lora_r": "train.lora.r",
    "lora_rank": "train.lora.r",
    "lora_alpha": "train.lora.alpha",
    "lora_dropout": "train.lora.dropout",
    "lora_target_modules": "train.lora.target_modules",
    "use_rslora": "train.lora.rslora",
    "max_seq_length": "data.clean.max_tokens",
    "max_seq_len": "data.clean.max_tokens",
    "max_length": "data.clean.max_tokens",
    "sequence_len": "data.clean.max_tokens",
    "lr_scheduler_type": "train.scheduler",
    "optim": "train.optimizer",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_checkpoints",
    "model_name_or_path": "model.id",
    "base_model": "model.id",
    "output_dir": "runs_dir",
    "dataset": "data.sources",
    "datasets": "data.sources",
    "train_file": "data.sources",
}


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section that `loc` points into (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            break
        current = _section_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    """Unwrap list[X], X | None, dict[str, X] to the BaseModel X, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _keys_by_name(model: type[BaseModel], prefix: str = "") -> dict[str, list[str]]:
    """Every key of the schema reachable through plain sections, by its last name: 'lr' -> ['train.lr']."""
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        out.setdefault(name, []).append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for key, paths in _keys_by_name(field.annotation, f"{dotted}.").items():
                out.setdefault(key, []).extend(paths)
    return out


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest_key(loc: tuple, schema: type[BaseModel]) -> str:
    """The hint for an unknown key: our name for another tool's key, the same name in another section, a close
    spelling in this section, or the valid keys here."""
    name = str(loc[-1])
    if name.lower() in OTHER_TOOLS_KEYS:
        return f"did you mean '{OTHER_TOOLS_KEYS[name.lower()]}'? ({name} is another tool's name for it)"
    elsewhere = _keys_by_name(schema).get(name, [])
    if elsewhere:
        return "did you mean " + " or ".join(f"'{p}'" for p in elsewhere) + "?"
    valid = _fields_at(schema, loc[:-1])
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{_format_loc(loc[:-1] + (close[0],))}'?"
    return f"valid keys here: {', '.join(valid)}"


_NUMBER_ERRORS = {"int_type", "float_type", "int_parsing", "float_parsing", "int_from_float"}


def _type_hint(kind: str, received: Any) -> str:
    """What to write instead, for a value of the wrong type (strict types: no silent conversion)."""
    if kind in _NUMBER_ERRORS:
        if isinstance(received, bool):
            return "true/false (also yes/no, on/off) is a boolean, not a number: write a number"
        if isinstance(received, str):
            try:
                float(received)
            except ValueError:
                return ""
            return "a quoted value is text, not a number: write it without quotes"
        if isinstance(received, float) and kind != "float_type":
            return "write a whole number"
    if kind == "bool_type":
        return "write true or false"
    if kind == "string_type" and isinstance(received, (bool, int, float)):
        return "for text, put it in quotes, e.g. \"123\""
    return ""


def problems(exc: ValidationError, schema: type[BaseModel], *, lines: dict[tuple, int] | None = None,
             overrides: list[tuple[tuple[str, ...], str]] = ()) -> list[str]:
    """One line per error: where it comes from (an override, or the file's line), the key, what is wrong."""
    found = []
    for err in _merge_union_members(exc.errors()):
        loc = err["loc"]
        key = _format_loc(loc) or "(top level)"
        received = err.get("input")
        if err["type"] == "extra_forbidden":
            text = f"{key}: unknown key. {_suggest_key(loc, schema)}"
        elif err["type"] == "missing":
            text = f"{key}: required, but not given"
        else:
            shown = repr(received)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = err["msg"].removeprefix("Value error, ")
            hint = _type_hint(err["type"], received)
            text = f"{key}: {msg}{'; ' + hint if hint else ''} (received {shown})"
        found.append(_origin(loc, lines or {}, overrides) + text)
    return found


def _merge_union_members(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic reports `str | list[str]` once per member, at loc + ('str',): one error per key instead."""
    out: list[dict[str, Any]] = []
    members: dict[tuple, dict[str, Any]] = {}
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        member = loc and isinstance(loc[-1], str) and re.fullmatch(r"(str|int|float|bool|(list|dict)\[.*\])", loc[-1])
        if member and loc[:-1] in members:
            members[loc[:-1]]["msg"] += " or " + err["msg"].removeprefix("Input should be ")
            continue
        err = {**err, "loc": loc[:-1] if member else loc}
        if member:
            members[err["loc"]] = err
        out.append(err)
    return out


def _origin(loc: tuple, lines: dict[tuple, int], overrides: list[tuple[tuple[str, ...], str]]) -> str:
    """'override 'train.lr=x': ' when an override set this key (or a section around it), else 'line N: '."""
    path = tuple(str(p) for p in loc)
    for parts, text in reversed(overrides):  # the last override of a key is the one that counts
        n = min(len(parts), len(path))
        if n and parts[:n] == path[:n]:
            return f"{OVERRIDE_PREFIX}{text!r}: "
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f"line {lines[path[:n]]}: "
    return ""
