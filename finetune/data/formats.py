"""Row formats: detect which one a source uses and turn each row into chat messages (or raw text).

Supported: OpenAI-style ``messages`` (role/content; content may be a list of text parts), ShareGPT
``conversations`` (from/value), Alpaca (instruction/input/output), prompt/completion, and raw ``text``; for
preference tuning, pairs (``prompt``/``chosen``/``rejected``, strings or message lists; without ``prompt`` the
message lists' shared beginning is the prompt, as in Hub datasets like UltraFeedback) and KTO's unpaired rows
(``prompt``/``completion``/``label``, the label a boolean).
A recipe can force the format and map its own column names onto a format's fields (``columns:``).
Role names are normalised the same way in every format (case-insensitive, common aliases: human -> user,
gpt/bot/model -> assistant, function/ipython -> tool), and each mapping is counted.

Agent conversations (OpenAI's shape) are validated field by field: a ``tools`` column (a list of function
definitions, or that list as JSON text), assistant ``tool_calls`` (``arguments`` a JSON object or its text; kept
as a parsed object, which is what chat templates expect), ``tool`` messages answering a call (``tool_call_id``
must name a call of the assistant turn they follow), and reasoning: a ``reasoning_content`` field (aliases
``reasoning``, ``thinking``) or inline ``<think>...</think>`` / ``[THINK]...[/THINK]`` at the start of the content,
which is moved into ``reasoning_content`` so the recipe's ``data.reasoning`` setting can act on it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from finetune.errors import UserError

# format -> (required fields, optional fields)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "preference": (("chosen", "rejected"), ("prompt", "system")),
    "kto": (("prompt", "completion", "label"), ("system",)),
    "messages": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "text": (("text",), ()),
}
# Role names seen in chat datasets (OpenAI, ShareGPT, Gemini, LangChain), lower-cased -> our role.
ROLE_ALIASES = {"system": "system", "developer": "system",
                "user": "user", "human": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                "tool": "tool", "function": "tool", "ipython": "tool"}
ROLES = ("system", "user", "assistant", "tool")
# Fields an assistant turn may carry its reasoning in (datasets differ); stored as reasoning_content.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# Inline reasoning at the start of an assistant reply: (opening marker, closing marker).
INLINE_REASONING = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))
# Column names that usually hold a question or an answer: used to suggest a `columns:` mapping.
PROMPT_LIKE = ("question", "query", "prompt", "input", "instruction", "context", "source", "q", "user", "request")
ANSWER_LIKE = ("answer", "response", "output", "completion", "target", "reply", "a", "assistant", "label", "summary")


@dataclass
class _Seen:
    """What reading one row changed, for the report: role names mapped ("human->user": 1) and numbers read as text
    by field ("messages[*].content": 1)."""

    roles: Counter[str] = dataclass_field(default_factory=Counter)
    numbers: Counter[str] = dataclass_field(default_factory=Counter)


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
    records = list(records)
    keys = column_names(records)
    inverse = {theirs: field for field, theirs in columns.items()}
    present = {inverse.get(k, k) for k in keys}
    order = ("preference", "kto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
    fitting = [fmt for fmt in order if all(f in FIELDS[fmt][0] + FIELDS[fmt][1] for f in columns)]
    for fmt in fitting or order:
        if fmt == "kto" and not _any_verdict(records, columns.get("label", "label")):
            continue  # no label is true/false: a class column beside prompt/completion, SFT rows (prepare notes it)
        if all(f in present for f in FIELDS[fmt][0]):
            return fmt
    absent = [(field, theirs) for field, theirs in columns.items() if theirs not in keys]
    if keys and absent:
        raise _absent_column(absent[0][1], absent[0][0], True, "auto", keys, source=source, where=where)
    raise UserError(f"{where}: {source}: cannot tell the row format. Columns found: {', '.join(keys) or '(none)'}. "
                    + suggest_mapping(keys))


def _any_verdict(records: list[dict[str, Any]], column: str) -> bool:
    """Whether a label column holds KTO verdicts: one true/false value makes it KTO's (the rows whose label is
    something else are then dropped as bad_label, each named), never plain prompt/completion with the labels lost."""
    return any(_label(r[column]) is not None for r in records if r.get(column) is not None)


def unused_label_note(records: Iterable[dict[str, Any]], origins: Iterable[str], fmt: str, columns: dict[str, str],
                      *, where: str) -> str | None:
    """What prepare says when detection read prompt/completion/label rows as prompt/completion (SFT) because no
    label is true or false: the label column is then not used, and the note names a value and its row."""
    column = columns.get("label", "label")
    if fmt != "prompt_completion":
        return None
    for rec, origin in zip(records, origins, strict=False):
        if rec.get(column) is not None:
            return (f"{where}: column {column!r} holds {rec[column]!r} ({origin}), not true/false, so the rows were "
                    "read as prompt/completion (SFT) and the label is not used. For KTO, make the label true or "
                    "false; to say SFT is meant, set format: prompt_completion")
    return None


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "good": True, "bad": False, "yes": True,
               "no": False, "desirable": True, "undesirable": False}


def _label(value: Any) -> bool | None:
    """KTO's label as a bool: booleans, 0/1, or true/false, yes/no, good/bad, desirable/undesirable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABEL_WORDS.get(value.strip().lower())
    return None


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
    seen = _Seen()

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
        return _with_mapped({"text": _text(get("text"), columns.get("text", "text"), seen)}, seen)
    if fmt == "preference":
        return _with_mapped(_pair(get, columns, seen), seen)
    if fmt == "kto":
        label = _label(get("label"))
        if label is None:
            raise RowError("bad_label", f"field {columns.get('label', 'label')!r} is {get('label')!r}: label must be "
                                        "true or false (KTO: true = desirable, false = undesirable)")
        prompt = _prompt_turns(get("prompt"), columns.get("prompt", "prompt"), seen)
        completion = _reply_turns(get("completion"), columns.get("completion", "completion"), seen)
        return _with_mapped(_with_system({"messages": prompt + completion, "desirable": label}, get, columns, seen), seen)
    if fmt == "messages":
        # A `messages` column may hold ShareGPT-style turns too (from/value): accept both.
        tools = _tools(get("tools", required=False), columns.get("tools", "tools"))
        msgs = _turns(get("messages"), columns.get("messages", "messages"), seen)
        check_tool_flow(msgs, tools, columns.get("messages", "messages"))
        return _with_mapped({"messages": msgs, **({"tools": tools} if tools else {})}, seen)
    if fmt == "sharegpt":
        msgs = _turns(get("conversations"), columns.get("conversations", "conversations"), seen)
    elif fmt == "alpaca":
        instruction = _text(get("instruction"), columns.get("instruction", "instruction"), seen)
        extra = get("input", required=False)
        extra = default_input if extra is None else _text(extra, columns.get("input", "input"), seen)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(get("output"), columns.get("output", "output"), seen)}]
    elif fmt == "prompt_completion":
        prompt, completion = get("prompt"), get("completion")
        # TRL's conversational prompt/completion: both are lists of messages
        p = _turns(prompt, "prompt", seen) if isinstance(prompt, list) else [
            {"role": "user", "content": _text(prompt, columns.get("prompt", "prompt"), seen)}]
        c = _turns(completion, "completion", seen) if isinstance(completion, list) else [
            {"role": "assistant", "content": _text(completion, columns.get("completion", "completion"), seen)}]
        msgs = p + c
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return _with_mapped(_with_system({"messages": msgs}, get, columns, seen), seen)


def _prompt_turns(value: Any, name: str, seen: _Seen) -> list[dict[str, Any]]:
    return _turns(value, name, seen) if isinstance(value, list) else [{"role": "user", "content": _text(value, name, seen)}]


def _reply_turns(value: Any, name: str, seen: _Seen) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return _turns(value, name, seen)
    return [{"role": "assistant", "content": _text(value, name, seen)}]


def _with_system(example: dict[str, Any], get, columns: dict[str, str], seen: _Seen) -> dict[str, Any]:
    """The row's `system` column as its first turn (unless its turns have one)."""
    system = get("system", required=False)
    if system is None:
        return example
    system = _text(system, columns.get("system", "system"), seen)
    msgs = example["messages"]
    if system.strip() and not any(m["role"] == "system" for m in msgs):
        example["messages"] = [{"role": "system", "content": system}] + msgs
        if "rejected" in example:
            example["rejected"] = [{"role": "system", "content": system}] + example["rejected"]
    return example


def _pair(get, columns: dict[str, str], seen: _Seen) -> dict[str, Any]:
    """A preference pair as two whole conversations sharing their prompt: {"messages": prompt + chosen,
    "rejected": prompt + rejected}."""
    c_name, r_name = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    prompt_value = get("prompt", required=False)
    chosen, rejected = get("chosen"), get("rejected")
    if prompt_value is not None:
        prompt = _prompt_turns(prompt_value, columns.get("prompt", "prompt"), seen)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # Hub shape: whole conversations; the prompt is their shared beginning up to the last assistant turn
        c_all, r_all = _turns(chosen, c_name, seen), _turns(rejected, r_name, seen)
        n = 0
        while n < min(len(c_all), len(r_all)) - 1 and c_all[n] == r_all[n]:
            n += 1
        while n > 0 and c_all[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0 or any(m["role"] != "assistant" for m in c_all[n:] + r_all[n:]):
            raise RowError("no_shared_prompt", f"{c_name!r} and {r_name!r} do not start with the same prompt "
                                               "followed by assistant replies; add a 'prompt' column")
        return {"messages": c_all, "rejected": r_all}
    else:
        raise RowError("missing_field", f"no 'prompt' field, and {c_name!r}/{r_name!r} are not message lists "
                                        "that carry it; map the prompt column with columns: {prompt: <column>}")
    example = {"messages": prompt + _reply_turns(chosen, c_name, seen),
               "rejected": prompt + _reply_turns(rejected, r_name, seen)}
    return _with_system(example, get, columns, seen)


def _with_mapped(example: dict[str, Any], seen: _Seen) -> dict[str, Any]:
    if seen.roles:
        example["roles_mapped"] = dict(seen.roles)
    if seen.numbers:
        example["numbers_as_text"] = dict(seen.numbers)
    return example


def normalize_role(name: Any) -> str | None:
    """Our role for a dataset's role name (case-insensitive, common aliases), or None when unknown."""
    return ROLE_ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def _text(value: Any, name: str, seen: _Seen) -> str:
    """A text field's value. A number (JSON 42, a Parquet integer column) is read as its text ("42") in every
    format, and counted by field in ``seen.numbers`` so prepare's report says so; anything else that is not text
    (true/false, a list, an object) is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seen.numbers[re.sub(r"\[\d+\]", "[*]", name)] += 1
        return str(value)
    raise RowError("bad_field_type", f"field {name!r} should be text, got {type(value).__name__}")


def _turns(value: Any, name: str, seen: _Seen) -> list[dict[str, Any]]:
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
            seen.roles[f"{given}->{role}"] += 1
        calls = turn.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
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
        message: dict[str, Any] = {"role": role, "content": "" if content is None else
                                   _text(content, f"{name}[{i}].content", seen)}
        if role == "assistant":
            reasoning = _reasoning(turn, message, f"{name}[{i}]")
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls is not None:
                parsed = _tool_calls(calls, f"{name}[{i}].tool_calls")
                if parsed:
                    message["tool_calls"] = parsed
        elif calls:
            raise RowError("bad_tool_call", f"{name}[{i}].tool_calls: only assistant turns make tool calls, this is "
                                            f"a {role} turn")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if turn.get(key) is not None:
                    if not isinstance(turn[key], str):
                        raise RowError("bad_tool_result", f"{name}[{i}].{key} should be text, got "
                                                          f"{type(turn[key]).__name__}")
                    message[key] = turn[key]
        out.append(message)
    return out


def _reasoning(turn: dict[str, Any], message: dict[str, Any], where: str) -> str | None:
    """The reasoning of an assistant turn: from a reasoning field, or split off inline markers at the start of
    the content (the content keeps only the answer)."""
    fields = [f for f in REASONING_FIELDS if turn.get(f) is not None]
    if len(fields) > 1:
        raise RowError("bad_reasoning", f"{where} has reasoning in both {fields[0]!r} and {fields[1]!r}; keep one")
    if fields:
        value = turn[fields[0]]
        if not isinstance(value, str):
            raise RowError("bad_reasoning", f"{where}.{fields[0]} should be text, got {type(value).__name__}")
        if any(opening in message["content"] for opening, _ in INLINE_REASONING):
            raise RowError("bad_reasoning", f"{where} has reasoning in {fields[0]!r} and inline reasoning markers in "
                                            "its content; keep one")
        return value
    content = message["content"]
    for opening, closing in INLINE_REASONING:
        stripped = content.lstrip()
        if stripped.startswith(opening) or (closing in content and opening not in content):
            if closing not in content:
                raise RowError("bad_reasoning", f"{where}.content opens {opening} but never closes it with {closing}")
            before, _, after = content.partition(closing)
            if opening in after or closing in after:
                raise RowError("bad_reasoning", f"{where}.content has more than one {opening}...{closing} block; "
                                                "put one reasoning block at the start of the reply")
            message["content"] = after.lstrip("\n")
            return before.split(opening, 1)[-1].strip("\n")
        if closing in content:
            raise RowError("bad_reasoning", f"{where}.content has {closing} after text; reasoning goes first, "
                                            f"as {opening}...{closing} at the start of the reply")
    return None


def _json_object(value: Any, where: str, reason: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(reason, f"{where} is not valid JSON ({exc.msg} at column {exc.colno}): "
                                   f"{value[:80]!r}") from None
    if not isinstance(value, dict):
        raise RowError(reason, f"{where} should be a JSON object, got {type(value).__name__}")
    return value


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls, checked: [{"id"?, "type": "function", "function": {"name", "arguments"}}].

    Bare {"name", "arguments"} entries (a common dataset shape) are accepted too; arguments are kept parsed."""
    if not isinstance(value, list):
        raise RowError("bad_tool_call", f"{where} should be a list of calls, got {type(value).__name__}")
    calls = []
    for k, call in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise RowError("bad_tool_call", f"{at} should be an object, got {type(call).__name__}")
        function = call.get("function", call)
        if call.get("type", "function") != "function":
            raise RowError("bad_tool_call", f"{at}.type is {call.get('type')!r}; only 'function' calls are supported")
        if not isinstance(function, dict):
            raise RowError("bad_tool_call", f"{at}.function should be an object, got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RowError("bad_tool_call", f"{at}.function.name is missing or not text")
        if "arguments" not in function:
            raise RowError("bad_tool_call", f"{at}.function.arguments is missing (use {{}} for a call without any)")
        arguments = _json_object(function["arguments"], f"{at}.function.arguments", "bad_tool_arguments")
        out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise RowError("bad_tool_call", f"{at}.id should be text, got {type(call['id']).__name__}")
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """The row's tool definitions (OpenAI: [{"type": "function", "function": {"name", "description",
    "parameters"}}]), given as a list or as its JSON text."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError("bad_tools", f"field {where!r} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list):
        raise RowError("bad_tools", f"field {where!r} should be a list of tool definitions, got {type(value).__name__}")
    tools = []
    for k, tool in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(tool, dict):
            raise RowError("bad_tools", f"{at} should be an object, got {type(tool).__name__}")
        if "function" not in tool and "name" in tool:  # a bare function definition
            tool = {"type": "function", "function": tool}
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise RowError("bad_tools", f"{at} should be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise RowError("bad_tools", f"{at}.function.name is missing or not text")
        if "parameters" in function:
            function = {**function, "parameters": _json_object(function["parameters"], f"{at}.function.parameters",
                                                               "bad_tools")}
        tools.append({"type": "function", "function": function})
    return tools


def check_tool_flow(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None, name: str) -> None:
    """Every call names a defined tool (when tools are given); every tool message answers a call of the
    assistant turn before it (by tool_call_id when the calls have ids), at most one answer per call."""
    known = {t["function"]["name"] for t in tools} if tools else None
    pending: dict[str, str] = {}  # call id -> function name, for the last assistant turn with calls
    unanswered = 0
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            calls = m.get("tool_calls", [])
            for k, call in enumerate(calls):
                fn = call["function"]["name"]
                if known is not None and fn not in known:
                    raise RowError("unknown_tool", f"{name}[{i}].tool_calls[{k}] calls {fn!r}, which is not in the "
                                                   f"row's tools ({', '.join(sorted(known))})")
            pending = {c["id"]: c["function"]["name"] for c in calls if "id" in c}
            unanswered = len(calls)
        elif m["role"] == "tool":
            if unanswered == 0:
                raise RowError("unmatched_tool_result", f"{name}[{i}] is a tool result, but no tool call of the "
                                                        "assistant turn before it is left to answer")
            call_id = m.get("tool_call_id")
            if pending:
                if call_id is None:
                    raise RowError("unmatched_tool_result", f"{name}[{i}] has no tool_call_id; the calls it may "
                                                            f"answer have ids {', '.join(sorted(pending))}")
                if call_id not in pending:
                    raise RowError("unmatched_tool_result", f"{name}[{i}].tool_call_id {call_id!r} matches no call "
                                                            f"of the assistant turn before it (ids: "
                                                            f"{', '.join(sorted(pending))})")
                del pending[call_id]
            unanswered -= 1
        elif m["role"] == "user":
            pending, unanswered = {}, 0


def read_conversation(messages: Any, tools: Any, name: str = "messages") -> tuple[list[dict[str, Any]],
                                                                                  list[dict[str, Any]] | None]:
    """(messages, tools) of one agent conversation, validated as a data row is (the server takes requests so)."""
    msgs = _turns(messages, name, _Seen())
    parsed = _tools(tools, "tools")
    check_tool_flow(msgs, parsed, name)
    return msgs, parsed
