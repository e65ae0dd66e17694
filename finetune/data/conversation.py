"""Reading one conversation: role names normalised (case-insensitive, common aliases: human -> user, gpt/bot/model
-> assistant, function/ipython -> tool, each mapping counted), text fields, and agent turns validated field by field:
a ``tools`` column (a list of function definitions, or that list as JSON text), assistant ``tool_calls``
(``arguments`` a JSON object or its text; kept as a parsed object, which is what chat templates expect), ``tool``
messages answering a call (``tool_call_id`` must name a call of the assistant turn they follow), and reasoning: a
``reasoning_content`` field (aliases ``reasoning``, ``thinking``) or inline ``<think>...</think>`` /
``[THINK]...[/THINK]`` at the start of the content, moved into ``reasoning_content`` so the recipe's
``data.reasoning`` setting can act on it. ``finetune.data.formats`` turns a row of any format into these turns.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

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


@dataclass
class Seen:
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


def normalize_role(name: Any) -> str | None:
    """Our role for a dataset's role name (case-insensitive, common aliases), or None when unknown."""
    return ROLE_ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None


def text(value: Any, name: str, seen: Seen) -> str:
    """A text field's value. A number (JSON 42, a Parquet integer column) is read as its text ("42") in every
    format, and counted by field in ``seen.numbers`` so prepare's report says so; anything else that is not text
    (true/false, a list, an object) is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seen.numbers[re.sub(r"\[\d+\]", "[*]", name)] += 1
        return str(value)
    raise RowError("bad_field_type", f"field {name!r} should be text, got {type(value).__name__}")


def turns(value: Any, name: str, seen: Seen) -> list[dict[str, Any]]:
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
                                   text(content, f"{name}[{i}].content", seen)}
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


def tools_of(value: Any, where: str) -> list[dict[str, Any]] | None:
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
    msgs = turns(messages, name, Seen())
    parsed = tools_of(tools, "tools")
    check_tool_flow(msgs, parsed, name)
    return msgs, parsed
