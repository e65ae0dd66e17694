"""Read a model's reply back into its parts: reasoning, answer text and tool calls (OpenAI's shape).

The reply is the generated text with special tokens kept. Which syntax to read is told by the chat template the
model was trained and served with, because that template taught the model how to write a call:

  hermes     ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``   Qwen2.5, Qwen3 (and Hermes-style ChatML)
  xml        ``<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>``   Qwen3.5, Qwen3-Coder
  llama3     a JSON object ``{"name": ..., "parameters": {...}}`` as the whole reply   Llama 3.1 / 3.2 / 3.3
  mistral    ``[TOOL_CALLS]NAME[CALL_ID]ID[ARGS]{...}`` (Ministral 3, Mistral Small 3.2) or
             ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` (Mistral Nemo, 7B v0.3)
  harmony    ``to=functions.NAME<|channel|>commentary json<|message|>{...}<|call|>``   gpt-oss

Reasoning: ``<think>...</think>`` (Qwen3, Qwen3.5, SmolLM3; the opening tag may be in the prompt),
``[THINK]...[/THINK]`` (Ministral 3 reasoning), gpt-oss's analysis channel.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TOOL_SYNTAXES = ("hermes", "xml", "llama3", "mistral", "harmony")


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"name": str, "arguments": dict}]
    unparsed: str | None = None  # a call the model began but wrote wrongly (e.g. arguments that are not JSON)

    def openai_tool_calls(self) -> list[dict[str, Any]]:
        """The calls as OpenAI returns them: arguments as JSON text, each with an id."""
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for c in self.tool_calls]


def tool_syntax(template: str) -> str | None:
    """Which tool-call syntax a chat template teaches (TOOL_SYNTAXES), or None when it has none we can read."""
    if "<|channel|>" in template and "functions." in template:
        return "harmony"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<function=" in template and "<parameter=" in template:
        return "xml"
    if "<tool_call>" in template:
        return "hermes"
    if '"parameters": ' in template and "tool_call.name" in template:
        return "llama3"
    return None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply with ``<think>``/``[THINK]`` markers; (None, text) without them.

    A closing tag without an opening one means the template's generation prompt opened the block (Qwen3.5)."""
    for opening, closing in (("<think>", "</think>"), ("[THINK]", "[/THINK]")):
        if closing in text:
            before, _, after = text.partition(closing)
            return before.split(opening, 1)[-1].strip(), after.strip()
        if text.lstrip().startswith(opening):  # the reply ran out inside its reasoning
            return text.lstrip()[len(opening):].strip(), ""
    return None, text


def parse_reply(text: str, template: str, *, tools: list[dict[str, Any]] | None = None,
                end_tokens: tuple[str, ...] = ()) -> Reply:
    """The reply's reasoning, answer and tool calls, read with the syntax its chat template teaches.
    ``tools`` (OpenAI definitions) types the values of the XML syntax, which writes every value as text."""
    from finetune.data.render import END_OF_TURN_TOKENS

    for tok in end_tokens:
        text = text.replace(tok, "")
    syntax = tool_syntax(template)
    stripped = text.rstrip()
    closers = [t for t in END_OF_TURN_TOKENS if stripped.endswith(t)]
    if closers and syntax != "harmony":  # the turn's closing token is no part of the answer
        text = stripped[: -len(closers[0])]
    if syntax == "harmony":
        return _harmony(text)
    reasoning, answer = split_reasoning(text)
    reply = Reply(content=answer, reasoning=reasoning)
    if syntax == "hermes":
        _hermes(reply)
    elif syntax == "xml":
        _xml(reply, tools)
    elif syntax == "llama3":
        _llama3(reply)
    elif syntax == "mistral":
        _mistral(reply)
    return reply


def _arguments(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _hermes(reply: Reply) -> None:
    blocks = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", reply.content, flags=re.S)
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            reply.unparsed = block
            continue
        args = _arguments(call.get("arguments", call.get("parameters", {}))) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or args is None:
            reply.unparsed = block
            continue
        reply.tool_calls.append({"name": call["name"], "arguments": args})
    if blocks:
        reply.content = reply.content.split("<tool_call>", 1)[0].strip()


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    if schema and schema.get("type") == "string":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _xml(reply: Reply, tools: list[dict[str, Any]] | None) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}).get("properties", {})
               for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    calls = re.findall(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*(?:</tool_call>|$)", reply.content,
                       flags=re.S)
    for name, body in calls:
        props = schemas.get(name, {})
        args = {k: _typed(v.strip("\n"), props.get(k))
                for k, v in re.findall(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", body, flags=re.S)}
        reply.tool_calls.append({"name": name.strip(), "arguments": args})
    if "<tool_call>" in reply.content:
        if not calls:
            reply.unparsed = reply.content.split("<tool_call>", 1)[1]
        reply.content = reply.content.split("<tool_call>", 1)[0].strip()


def _llama3(reply: Reply) -> None:
    text = reply.content.strip().removeprefix("<|python_tag|>").strip()
    if not text.startswith("{"):
        return
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        if '"name"' in text:
            reply.unparsed = text
        return
    args = _arguments(call.get("parameters", call.get("arguments"))) if isinstance(call, dict) else None
    if isinstance(call, dict) and isinstance(call.get("name"), str) and args is not None:
        reply.tool_calls.append({"name": call["name"], "arguments": args})
        reply.content = ""


def _mistral(reply: Reply) -> None:
    if "[TOOL_CALLS]" not in reply.content:
        return
    head, _, rest = reply.content.partition("[TOOL_CALLS]")
    reply.content = head.strip()
    rest = rest.strip()
    if rest.startswith("["):  # [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]
        try:
            calls = json.loads(rest)
        except json.JSONDecodeError:
            reply.unparsed = rest
            return
        for call in calls if isinstance(calls, list) else []:
            args = _arguments(call.get("arguments")) if isinstance(call, dict) else None
            if args is None or not isinstance(call.get("name"), str):
                reply.unparsed = rest
                continue
            reply.tool_calls.append({"name": call["name"], "arguments": args})
        return
    for part in ("[TOOL_CALLS]" + rest).split("[TOOL_CALLS]")[1:]:  # NAME[CALL_ID]ID[ARGS]{...}
        name, sep, args_text = part.partition("[ARGS]")
        name = name.split("[CALL_ID]", 1)[0].strip()
        args = _arguments(args_text.strip()) if sep else None
        if args is None or not name:
            reply.unparsed = part
            continue
        reply.tool_calls.append({"name": name, "arguments": args})


_HARMONY_MESSAGE = re.compile(
    r"(?:<\|start\|>assistant)?(?P<header>.*?)<\|message\|>(?P<body>.*?)(?:<\|end\|>|<\|call\|>|<\|return\|>|$)",
    flags=re.S)


def _harmony(text: str) -> Reply:
    reply = Reply(content="")
    answer: list[str] = []
    thoughts: list[str] = []
    for m in _HARMONY_MESSAGE.finditer(text):
        header, body = m.group("header"), m.group("body")
        if not header and not body:
            continue
        recipient = re.search(r"to=functions\.([^\s<]+)", header)
        if recipient:
            args = _arguments(body.strip())
            if args is None:
                reply.unparsed = body
            else:
                reply.tool_calls.append({"name": recipient.group(1), "arguments": args})
        elif "analysis" in header:
            thoughts.append(body.strip())
        else:  # final (or a message without a channel)
            answer.append(body.strip())
    if not answer and not thoughts and not reply.tool_calls and "<|message|>" not in text:
        answer.append(text.strip())  # no harmony structure at all: the text is the answer
    reply.content = "\n".join(a for a in answer if a)
    reply.reasoning = "\n".join(thoughts) if thoughts else None
    return reply


_OPENINGS = ("<think>", "[THINK]")
_MARKERS = ("<think>", "</think>", "[THINK]", "[/THINK]", "<|channel|>", "<|message|>", "<|end|>", "<|start|>",
            "<|return|>", "<|call|>", "<|constrain|>")


def reply_parts(text: str, template: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply without tool calls: gpt-oss's channels when its template is harmony's,
    else the ``<think>``/``[THINK]`` block."""
    if tool_syntax(template) == "harmony":
        reply = _harmony(text)
        return reply.reasoning, reply.content
    return split_reasoning(text)


class ReplyStream:
    """A reply read while it streams: ``feed`` takes each new piece of text (special tokens kept) and returns the
    new ("reasoning" | "content", text) pieces, so that a client sees reasoning apart from the answer as it comes,
    never a marker. Text that may be the start of a marker (``<thi``, a harmony header without its
    ``<|message|>``) waits for the next piece. ``prompt``: a generation prompt that opened the reasoning block
    itself (Qwen3.5's ``<think>\\n``) makes the reply start inside it."""

    def __init__(self, template: str, prompt: str = ""):
        self.template = template
        self.harmony = tool_syntax(template) == "harmony"
        tail = prompt.rstrip()
        self.opened = next((o for o in _OPENINGS if tail.endswith(o)), "")
        self.text = ""
        self.sent = {"reasoning": "", "content": ""}

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.text += piece
        return self._emit(self._settled(self.text))

    def finish(self) -> list[tuple[str, str]]:
        return self._emit(self.text)

    def _settled(self, text: str) -> str:
        for marker in _MARKERS:  # a marker cut in two by the token stream
            for k in range(len(marker) - 1, 0, -1):
                if text.endswith(marker[:k]):
                    text = text[:-k]
                    break
        if self.harmony:  # a header (channel, recipient) is only known once its <|message|> arrives
            last = max(text.rfind("<|start|>"), text.rfind("<|channel|>"))
            if last >= 0 and "<|message|>" not in text[last:]:
                text = text[:last]
        return text

    def _emit(self, text: str) -> list[tuple[str, str]]:
        reasoning, content = reply_parts(self.opened + text, self.template)
        out = []
        for part, now in (("reasoning", reasoning or ""), ("content", content)):
            before = self.sent[part]
            if len(now) > len(before) and now.startswith(before):
                out.append((part, now[len(before):]))
                self.sent[part] = now
        return out
