"""Row formats: detect which one a source uses and turn each row into chat messages (or raw text).

Supported: OpenAI-style ``messages`` (role/content; content may be a list of text parts), ShareGPT
``conversations`` (from/value), Alpaca (instruction/input/output), prompt/completion, and raw ``text``.
A recipe can force the format and map its own column names onto a format's fields (``columns:``).
"""

from __future__ import annotations

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
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
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


def detect_format(records: Iterable[dict[str, Any]], columns: dict[str, str], *, source: str, where: str) -> str:
    """The format of a source from the keys of its first rows (after the `columns:` mapping)."""
    keys: list[str] = []
    for rec in records:
        keys += [k for k in rec if k not in keys]
    inverse = {theirs: field for field, theirs in columns.items()}
    present = {inverse.get(k, k) for k in keys}
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if all(f in present for f in FIELDS[fmt][0]):
            return fmt
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
    """One row as {"messages": [...]} or {"text": ...}. Raises RowError with the reason when unusable."""

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
        return {"messages": _turns(get("messages"), columns.get("messages", "messages"))}
    if fmt == "sharegpt":
        msgs = _turns(get("conversations"), columns.get("conversations", "conversations"))
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
        p = _turns(prompt, "prompt") if isinstance(prompt, list) else [
            {"role": "user", "content": _text(prompt, columns.get("prompt", "prompt"))}]
        c = _turns(completion, "completion") if isinstance(completion, list) else [
            {"role": "assistant", "content": _text(completion, columns.get("completion", "completion"))}]
        msgs = p + c
    else:
        raise ValueError(f"unknown format {fmt!r}")
    system = get("system", required=False)
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV-like numbers in an answer column are fine as text
    raise RowError("bad_field_type", f"field {name!r} should be text, got {type(value).__name__}")


def _turns(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else type(value).__name__
        raise RowError("bad_field_type", f"field {name!r} should be a non-empty list of turns, got {kind}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError("bad_field_type", f"{name}[{i}] should be an object, got {type(turn).__name__}")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")).lower(), turn.get("from")), turn.get("value")
        else:
            raise RowError("missing_field", f"{name}[{i}] has neither role/content nor from/value keys "
                                            f"(keys: {', '.join(map(str, turn))})")
        if role not in ROLES:
            raise RowError("unknown_role", f"{name}[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
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
