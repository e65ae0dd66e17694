"""Row formats: detect which one a source uses and turn each row into chat messages (or raw text).

Supported: OpenAI-style ``messages`` (role/content; content may be a list of text parts), ShareGPT
``conversations`` (from/value), Alpaca (instruction/input/output), prompt/completion, and raw ``text``.
A recipe can force the format and map its own column names onto a format's fields (``columns:``).
Role names are normalised the same way in every format (case-insensitive, common aliases: human -> user,
gpt/bot/model -> assistant), and each mapping is counted.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable
from typing import Any

from finetune.errors import UserError

# format -> (required fields, optional fields)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}
# Role names seen in chat datasets (OpenAI, ShareGPT, Gemini, LangChain), lower-cased -> our role.
ROLE_ALIASES = {"system": "system", "developer": "system",
                "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}
ROLES = ("system", "user", "assistant")
# Column names that usually hold a question or an answer: used to suggest a `columns:` mapping.
PROMPT_LIKE = ("question", "query", "prompt", "input", "instruction", "context", "source", "q", "user", "request")
ANSWER_LIKE = ("answer", "response", "output", "completion", "target", "reply", "a", "assistant", "label", "summary")


class RowError(ValueError):
    """A row that cannot be used. ``reason`` is a stable key for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def check_columns(fmt: str, columns: dict[str, str], where: str) -> None:
    """A `columns:` mapping may only name fields of the chosen format."""
    if fmt == "auto" or not columns:
        return
    required, optional = FIELDS[fmt]
    unknown = [k for k in columns if k not in required + optional]
    if unknown:
        raise UserError(f"{where}.columns: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field of "
                        f"format '{fmt}'; its fields are: {', '.join(required + optional)} (map field: your_column)")


def column_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every column that appears in at least one row, in order of first appearance."""
    seen: dict[str, None] = {}
    for rec in records:
        for k in rec:
            seen.setdefault(k, None)
    return list(seen)


def _absent_column(column: str, field: str, mapped: bool, fmt: str, keys: list[str], *, source: str, where: str) -> UserError:
    same_case = [k for k in keys if k.lower() == column.lower()]
    close = same_case or difflib.get_close_matches(column, keys, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?{' (column names are case-sensitive)' if same_case else ''}" if close else ""
    found = ", ".join(keys) or "(none)"
    if mapped:
        return UserError(f"{where}.columns.{field}: column {column!r} is in no row of {source}. Columns found: "
                         f"{found}.{hint}")
    return UserError(f"{where}: format {fmt!r} needs a column {field!r}, which no row of {source} has. Columns found: "
                     f"{found}. Map yours: columns: {{{field}: <your column>}}.{hint}")


def check_fields_present(records: Iterable[dict[str, Any]], fmt: str, columns: dict[str, str], *, source: str,
                         where: str) -> None:
    """Every field the format needs (and every mapped one) is a column of at least one row.

    Without this, a misspelled column drops every row as ``missing_field`` and prepare "finishes" on nothing."""
    if fmt not in FIELDS:
        return
    keys = column_names(records)
    if not keys:
        return  # no row was read at all: the reader has reported why
    required, optional = FIELDS[fmt]
    for field in required + tuple(f for f in optional if f in columns):
        column = columns.get(field, field)
        if column not in keys:
            raise _absent_column(column, field, field in columns, fmt, keys, source=source, where=where)


def detect_format(records: Iterable[dict[str, Any]], columns: dict[str, str], *, source: str, where: str) -> str:
    """The format of a source from the keys of its first rows (after the `columns:` mapping).

    A `columns:` mapping narrows the choice to the formats that have the mapped fields; when none fits because
    a mapped column is in no row, the error names that column (not "cannot tell the row format")."""
    keys = column_names(records)
    inverse = {theirs: field for field, theirs in columns.items()}
    present = {inverse.get(k, k) for k in keys}
    order = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
    fitting = [fmt for fmt in order if all(f in FIELDS[fmt][0] + FIELDS[fmt][1] for f in columns)]
    for fmt in fitting or order:
        if all(f in present for f in FIELDS[fmt][0]):
            return fmt
    absent = [(field, theirs) for field, theirs in columns.items() if theirs not in keys]
    if keys and absent:
        raise _absent_column(absent[0][1], absent[0][0], True, "auto", keys, source=source, where=where)
    raise UserError(f"{where}: {source}: cannot tell the row format. Columns found: {', '.join(keys) or '(none)'}. "
                    + suggest_mapping(keys))


def suggest_mapping(keys: list[str]) -> str:
    lower = {k.lower(): k for k in keys}
    prompt = next((lower[c] for c in PROMPT_LIKE if c in lower), None)
    answer = next((lower[c] for c in ANSWER_LIKE if c in lower and lower[c] != prompt), None)
    if prompt and answer:
        return (f"Add to the source:  format: prompt_completion  and  columns: {{prompt: {prompt}, completion: {answer}}}")
    return ("Add to the source a format (messages, sharegpt, alpaca, prompt_completion, text) and a mapping, e.g. "
            "columns: {prompt: <your question column>, completion: <your answer column>}")


def to_example(rec: dict[str, Any], fmt: str, columns: dict[str, str], *, default_input: str = "") -> dict[str, Any]:
    """One row as {"messages": [...]} or {"text": ...}. Raises RowError with the reason when unusable.

    When a role name was mapped (``human`` -> ``user``), the example also holds ``"roles_mapped":
    {"human->user": 1, ...}``; ``clean.clean_example`` moves that count into its changes."""
    mapped: Counter[str] = Counter()

    def get(name: str, required: bool = True) -> Any:
        col = columns.get(name, name)
        if col not in rec:
            if required:
                raise RowError("missing_field", f"missing field {col!r}")
            return None
        value = rec[col]
        if value is None and required:
            raise RowError("null_field", f"field {col!r} is null")
        return value

    if fmt == "text":
        return {"text": _text(get("text"), "text")}
    if fmt == "messages":
        # A `messages` column may hold ShareGPT-style turns too (from/value): accept both.
        return _with_mapped({"messages": _turns(get("messages"), columns.get("messages", "messages"), mapped)}, mapped)
    if fmt == "sharegpt":
        msgs = _turns(get("conversations"), columns.get("conversations", "conversations"), mapped)
    elif fmt == "alpaca":
        instruction = _text(get("instruction"), columns.get("instruction", "instruction"))
        extra = get("input", required=False)
        extra = default_input if extra is None else _text(extra, columns.get("input", "input"))
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(get("output"), columns.get("output", "output"))}]
    elif fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        # TRL's conversational prompt/completion: both are lists of messages
        p = _turns(prompt, "prompt", mapped) if isinstance(prompt, list) else [
            {"role": "user", "content": _text(prompt, columns.get("prompt", "prompt"))}]
        c = _turns(completion, "completion", mapped) if isinstance(completion, list) else [
            {"role": "assistant", "content": _text(completion, columns.get("completion", "completion"))}]
        msgs = p + c
    else:
        raise ValueError(f"unknown format {fmt!r}")
    system = get("system", required=False)
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return _with_mapped({"messages": msgs}, mapped)


def _with_mapped(example: dict[str, Any], mapped: Counter[str]) -> dict[str, Any]:
    if mapped:
        example["roles_mapped"] = dict(mapped)
    return example


def normalize_role(name: Any) -> str | None:
    """Our role for a dataset's role name (case-insensitive, common aliases), or None when unknown."""
    return ROLE_ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV-like numbers in an answer column are fine as text
    raise RowError("bad_field_type", f"field {name!r} should be text, got {type(value).__name__}")


def _turns(value: Any, name: str, mapped: Counter[str]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else type(value).__name__
        raise RowError("bad_field_type", f"field {name!r} should be a non-empty list of turns, got {kind}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError("bad_field_type", f"{name}[{i}] should be an object, got {type(turn).__name__}")
        if "role" in turn:
            given, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            given, content = turn.get("from"), turn.get("value")
        else:
            raise RowError("missing_field", f"{name}[{i}] has neither role/content nor from/value keys "
                                            f"(keys: {', '.join(map(str, turn))})")
        role = normalize_role(given)
        if role is None:
            raise RowError("unknown_role", f"{name}[{i}] has role {given!r}; expected one of {', '.join(ROLES)} "
                                           f"(or an alias: {', '.join(a for a in ROLE_ALIASES if a not in ROLES)})")
        if given != role:
            mapped[f"{given}->{role}"] += 1
        if content is None:
            raise RowError("empty_turn", f"{name}[{i}] ({role}) has no content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise RowError("unsupported_content", f"{name}[{i}] has a {kind!r} part; only text is supported")
            content = "".join(parts)
        out.append({"role": role, "content": _text(content, f"{name}[{i}].content")})
    return out
