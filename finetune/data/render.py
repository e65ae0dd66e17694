"""Render conversations with the model's own chat template into input ids and a loss mask.

The ids are exactly what ``tokenizer.apply_chat_template(messages, tokenize=True)`` produces: the template is
rendered to text and that text is tokenized once (``add_special_tokens=False``, as transformers does). The loss
mask comes from the text, not from ``{% generation %}`` markers, which most shipped templates lack: for every
assistant turn i the template is rendered for ``messages[:i]`` with the generation prompt; that text is a prefix
of the full text and ends where the assistant's reply begins. The reply ends after its content plus the
template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``...). Character spans
are mapped to tokens through the fast tokenizer's offsets.

Templates that do not render a conversation as a growing prefix (some put the system prompt into the last user
turn) fall back to locating the reply text itself after the previous message.

Agent conversations: a conversation's ``tools`` go to the template as its ``tools`` argument; an assistant turn's
``tool_calls`` are trained with it (the reply ends at the template's end-of-turn token after the last call's
arguments), tool results are prompt like user turns. Reasoning (``reasoning_content``) is handed to the template in
the field it reads (``reasoning_content``, gpt-oss's ``thinking``, Ministral's thinking chunk) and trained as part
of the reply; ``reasoning`` chooses what happens to it (``REASONING``), and ``template_kwargs`` gives the switch
(``enable_thinking``) that eval, chat and serve pass too, so every stage sees the same tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all", "last_assistant", "completion")
# What happens to an assistant turn's reasoning:
#   auto            as the template does at inference with no switch: reasoning in the data is rendered where the
#                   template shows it (and trained); a template with no place for reasoning drops it
#   keep            rendered and trained; a template with no place for it gets it inline as <think>...</think>
#   drop            removed from the data; the template renders the turn as if there had been none
#   answer_without  removed, and the template's thinking switch turned off (enable_thinking=false) in training,
#                   eval and serving alike: the model learns to answer without reasoning
REASONING = ("auto", "keep", "drop", "answer_without")
# Tokens that close an assistant turn in the families we know (the tool-call turn of gpt-oss ends with <|call|>,
# Llama 3.1's with <|eom_id|> for built-in tools).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<end_of_turn>", "<|end|>", "<|return|>",
                      "<|call|>", "<turn|>", "<|end_of_text|>", "<|endoftext|>")

Messages = Sequence[dict[str, Any]]


class RenderError(ValueError):
    """A conversation the chat template cannot render (the message says which turn and why)."""


def render_messages(tokenizer, messages: Messages, *, train_on: str = "assistant", max_tokens: int | None = None,
                    tools: list[dict[str, Any]] | None = None, reasoning: str = "auto") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 except on the trained tokens.

    train_on: "assistant" (every assistant turn: content, tool calls, reasoning as ``reasoning`` says, and the
    end-of-turn token), "all" (every token), "last_assistant" (only the final assistant turn), "completion"
    (everything after the prompt: the final assistant turn and whatever the template writes after it).
    max_tokens truncates from the right. tools: the conversation's tool definitions (OpenAI shape).
    """
    return render_batch(tokenizer, [messages], train_on=train_on, max_tokens=max_tokens,
                        tools=[tools], reasoning=reasoning)[0]


def render_batch(tokenizer, conversations: Sequence[Messages], *, train_on: str = "assistant",
                 max_tokens: int | None = None, tools: Sequence[list[dict[str, Any]] | None] | None = None,
                 reasoning: str = "auto") -> list[tuple[list[int], list[int]]]:
    """render_messages for many conversations at once (one batched tokenizer call: much faster).
    tools: one list of tool definitions (or None) per conversation."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not conversations:
        return []
    kwargs = template_kwargs(tokenizer.chat_template, reasoning) if getattr(tokenizer, "chat_template", None) else {}
    tools = list(tools) if tools is not None else [None] * len(conversations)
    conversations = [template_messages(c, tokenizer.chat_template or "", reasoning) for c in conversations]
    full = _apply(tokenizer, conversations, add_generation_prompt=False, tools=tools, kwargs=kwargs)

    # Prefix renders: messages[:i] + generation prompt for each assistant turn that gets loss.
    turn_index: list[list[int]] = []
    prefix_convs: list[list[dict[str, Any]]] = []
    prefix_tools: list[list[dict[str, Any]] | None] = []
    for conv, conv_tools in zip(conversations, tools, strict=True):
        turns = [i for i, m in enumerate(conv) if m.get("role") == "assistant"]
        if train_on in ("last_assistant", "completion"):
            turns = turns[-1:]
        elif train_on == "all":
            turns = []
        turn_index.append(turns)
        prefix_convs += [list(conv[:i]) for i in turns if i > 0]
        prefix_tools += [conv_tools for i in turns if i > 0]
    prefixes = iter(_apply(tokenizer, prefix_convs, add_generation_prompt=True, tools=prefix_tools, kwargs=kwargs)
                    if prefix_convs else [])

    special = _special_ids(tokenizer)
    closers = _closer_ids(tokenizer)
    out = []
    for conv, text, turns, tokens in zip(conversations, full, turn_index, _encode(tokenizer, full), strict=True):
        ids = tokens.ids
        if train_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            cursor = 0
            for i in turns:
                prefix = next(prefixes) if i > 0 else ""
                start, content_end = _locate_reply(text, prefix, conv, i, cursor)
                first = tokens.first_token_ending_after(start)
                if train_on == "completion":
                    last = len(ids)
                elif conv[i].get("tool_calls"):
                    last = _end_of_tool_turn(text, content_end, conv, i, tokens, closers, special, start)
                else:
                    last = _end_of_turn(text, start, content_end, tokens, special)
                labels[first:last] = ids[first:last]
                cursor = tokens.end_char(last - 1) if last > 0 else 0
        if max_tokens is not None and len(ids) > max_tokens:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        out.append((ids, labels))
    return out


def render_prompts(tokenizer, conversations: Sequence[Messages], *,
                   tools: Sequence[list[dict[str, Any]] | None] | None = None,
                   reasoning: str = "auto") -> list[tuple[list[int], list[int]]]:
    """Prompt-only conversations (reward-driven training: they end with the turn the model answers): every turn
    and the template's generation prompt, as ``prompt_text`` renders them, with no trained token (labels all -100).
    tools: one list of tool definitions (or None) per conversation."""
    if not conversations:
        return []
    kwargs = template_kwargs(tokenizer.chat_template, reasoning) if getattr(tokenizer, "chat_template", None) else {}
    tools = list(tools) if tools is not None else [None] * len(conversations)
    conversations = [template_messages(c, tokenizer.chat_template or "", reasoning) for c in conversations]
    texts = _apply(tokenizer, conversations, add_generation_prompt=True, tools=tools, kwargs=kwargs)
    return [(list(t.ids), [IGNORE_INDEX] * len(t.ids)) for t in _encode(tokenizer, texts)]


def render_text(tokenizer, texts: Sequence[str], *, max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Raw text for continued pre-training: BOS (if the tokenizer uses one) + text + EOS, loss on every token."""
    out = []
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    for ids in enc:
        ids = list(ids)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        out.append((ids, list(ids)))
    return out


def prompt_text(tokenizer, messages: Messages, *, tools: list[dict[str, Any]] | None = None,
                reasoning: str = "auto") -> str:
    """The prompt a model sees to produce the final assistant turn (messages before it + generation prompt)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    template = getattr(tokenizer, "chat_template", None) or ""
    conv = template_messages(messages[:last], template, reasoning)
    kwargs = template_kwargs(template, reasoning) if template else {}
    return _apply(tokenizer, [conv], add_generation_prompt=True, tools=[tools], kwargs=kwargs)[0]


def has_thinking_switch(template: str) -> bool:
    """Whether a chat template reads ``enable_thinking`` (Qwen3, Qwen3.5, SmolLM3)."""
    return "enable_thinking" in template


def template_kwargs(template: str, reasoning: str) -> dict[str, Any]:
    """Extra variables for the chat template under a reasoning setting; the same in training, eval and serving."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
    if reasoning != "answer_without":
        return {}
    if not has_thinking_switch(template):
        raise RenderError("data.reasoning is answer_without, but this model's chat template has no thinking switch "
                          "(enable_thinking); use data.reasoning: drop (or auto)")
    return {"enable_thinking": False}


def reasoning_field(template: str) -> str:
    """Where a chat template reads an assistant turn's reasoning: 'reasoning_content' (Qwen3, Qwen3.5),
    'thinking' (gpt-oss), 'chunk' (Ministral's [THINK] content chunk), 'inline' (<think>...</think> written into
    the content: SmolLM3), or 'none' (no place for it)."""
    if "reasoning_content" in template:
        return "reasoning_content"
    if "message.thinking" in template or '"thinking" in message' in template:
        return "thinking"
    if "[THINK]" in template and "'thinking'" in template:
        return "chunk"
    if "<think>" in template:  # SmolLM3: the reply's content carries <think>...</think> itself
        return "inline"
    return "none"


def template_messages(messages: Messages, template: str, reasoning: str = "auto") -> list[dict[str, Any]]:
    """Messages as the chat template wants them: reasoning moved to the field the template reads (or removed,
    as ``reasoning`` says)."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
    field = reasoning_field(template)
    out = []
    for m in messages:
        if "reasoning_content" not in m:
            out.append(dict(m))
            continue
        m = dict(m)
        thought = m.pop("reasoning_content")
        if reasoning in ("drop", "answer_without") or not thought:
            pass
        elif field == "reasoning_content":
            m["reasoning_content"] = thought
        elif field == "thinking":
            m["thinking"] = thought
        elif field == "chunk":
            m["content"] = [{"type": "thinking", "thinking": thought}, {"type": "text", "text": m["content"]}]
        elif field == "inline" or reasoning == "keep":
            m["content"] = f"<think>\n{thought}\n</think>\n{m['content']}"
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _apply(tokenizer, conversations: list[list[dict[str, Any]]], *, add_generation_prompt: bool,
           tools: Sequence[list[dict[str, Any]] | None] | None = None, kwargs: dict[str, Any] | None = None) -> list[str]:
    if getattr(tokenizer, "chat_template", None) is None:
        from finetune.templates import names_hint

        raise RenderError(f"the tokenizer has no chat template (a base model?): {names_hint()}; or use a chat/instruct "
                          "model, or set data format to 'text' for raw text")
    tools = list(tools) if tools is not None else [None] * len(conversations)
    kwargs = kwargs or {}
    try:
        fast = _fast_renderer(tokenizer)
        if fast is not None:
            return [fast(conv, add_generation_prompt, conv_tools, kwargs)
                    for conv, conv_tools in zip(conversations, tools, strict=True)]
        if not any(tools):
            return list(tokenizer.apply_chat_template(conversations, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs))
        return [tokenizer.apply_chat_template(conv, tools=conv_tools, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, **kwargs)
                for conv, conv_tools in zip(conversations, tools, strict=True)]
    except Exception as exc:  # jinja raises for conversations a template refuses ("roles must alternate")
        raise RenderError(f"the chat template refused the conversation: {exc}") from None


# Per tokenizer object, dropped with it (an id() key could be reused by a later tokenizer and serve its stale entry)
_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fast_renderer(tokenizer):
    """The compiled template called directly: about 3x faster than apply_chat_template, which converts every
    message on every call. Used only after it rendered a probe conversation exactly like apply_chat_template."""
    key = tokenizer
    state = (tokenizer.chat_template, repr(sorted(tokenizer.special_tokens_map.items())))
    if key in _FAST and _FAST[key][0] == state:  # the same tokenizer object, unchanged
        return _FAST[key][1]
    render = None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.chat_template)
        extra = dict(tokenizer.special_tokens_map)

        def render(conv: list[dict[str, Any]], add_generation_prompt: bool, tools=None, kwargs=None) -> str:
            return compiled.render(messages=conv, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **extra, **(kwargs or {}))

        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                 {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
        fast = render
        for conv, gen in ((probe[1:3], False), (probe[1:], True), (probe, True), (probe[:3], False)):
            reference = _outcome(tokenizer.apply_chat_template, conv, tokenize=False, add_generation_prompt=gen)
            if _outcome(fast, conv, gen) != reference:
                render = None
                break
    except Exception:  # a transformers without this helper
        render = None
    _FAST[key] = (state, render)
    return render


def _outcome(fn, *args, **kwargs) -> tuple[str, str]:
    """What a render gives: ("ok", text) or ("error", message). Both ways must agree for the fast path."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:  # a template may refuse a probe (e.g. no system role): it must refuse both ways
        return "error", str(exc)


class _Tokens:
    """One encoded text: ids plus char<->token lookups (Rust-side for fast tokenizers)."""

    def __init__(self, ids: list[int], encoding=None, offsets: list[tuple[int, int]] | None = None):
        self.ids = ids
        self._enc = encoding
        self._offsets = offsets

    def chars(self, k: int) -> tuple[int, int]:
        if self._enc is not None:
            return self._enc.token_to_chars(k)
        return self._offsets[k]

    def end_char(self, k: int) -> int:
        return self.chars(k)[1]

    def first_token_ending_after(self, char: int) -> int:
        """Index of the first token whose text ends after `char` (the token holding it, or the next one)."""
        if self._enc is not None and 0 <= char:
            k = self._enc.char_to_token(char)
            if k is not None:
                return k
        lo, hi = 0, len(self.ids)
        while lo < hi:  # offsets are in order: binary search on token ends
            mid = (lo + hi) // 2
            if self.chars(mid)[1] <= char:
                lo = mid + 1
            else:
                hi = mid
        return lo


def _encode(tokenizer, texts: list[str]) -> list[_Tokens]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: same ids as tokenizer(text, add_special_tokens=False), less overhead.
        return [_Tokens(e.ids, encoding=e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [_Tokens(list(i), offsets=list(o)) for i, o in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # list of parts: [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _locate_reply(text: str, prefix: str, conv: Messages, i: int, cursor: int) -> tuple[int, int]:
    """(start, content_end) character positions of assistant turn i in the full rendered text."""
    content = _content_text(conv[i]).strip()
    grows = bool(prefix) and len(prefix) >= cursor and text.startswith(prefix)
    if grows:
        start = len(prefix)
    else:
        # Not a growing prefix (e.g. the system prompt moves into the last user turn): the reply is the first
        # occurrence of its text after the previous message's text.
        start = cursor
        before = _content_text(conv[i - 1]).strip() if i > 0 else ""
        pos = text.find(before, cursor) if before else -1
        if pos >= 0:
            start = pos + len(before)
        # The generation prompt's own text (what the prefix render writes after the previous message) marks where
        # the reply begins, also when the template renders earlier turns differently in the full conversation
        # (gpt-oss drops the analysis of a tool call that a later final answer follows).
        k = prefix.rfind(before) if prefix and before else -1
        tail = prefix[k + len(before):] if k >= 0 else ""
        at = text.find(tail, start) if tail.strip() and pos >= 0 else -1
        if at >= 0 and (not content or text.find(content, at + len(tail)) >= 0):
            start, grows = at + len(tail), True
    if not content:
        return start, start
    pos = text.find(content, start)
    if pos < 0:
        raise RenderError(f"message {i}: the assistant reply does not appear in the text the chat template renders")
    # Without a prefix, the template's assistant header (between the messages) stays prompt.
    return (start if grows else pos), pos + len(content)


def _end_of_turn(text: str, start: int, content_end: int, tokens: _Tokens, special: frozenset[int]) -> int:
    """Token index just after the reply: its content plus the template's end-of-turn token."""
    if content_end > start:  # the token holding the reply's last character is part of the reply
        end = tokens.first_token_ending_after(content_end - 1) + 1
    else:
        end = tokens.first_token_ending_after(start)
    for j in range(end, len(tokens.ids)):
        if tokens.ids[j] in special:
            return j + 1
        a, b = tokens.chars(j)
        if text[max(a, content_end):b].strip():
            # plain text before any end-of-turn token: the template closes turns with text, not a token
            break
    return end


def _end_of_tool_turn(text: str, content_end: int, conv: Messages, i: int, tokens: _Tokens,
                      closers: frozenset[int], special: frozenset[int], start: int) -> int:
    """Token index just after an assistant turn that calls tools: past its last call (found by the function
    names and argument values in order, however the template spells the call) to the template's end-of-turn
    token, never past the text of the next message."""
    import json

    pos = content_end
    for call in conv[i].get("tool_calls", []):
        function = call.get("function", call)
        at = text.find(function.get("name", ""), pos)
        if at < 0:
            from finetune.templates import TEMPLATES

            with_tools = ", ".join(t.name for t in TEMPLATES.values() if t.tools)
            raise RenderError(f"message {i}: the tool call {function.get('name')!r} does not appear in the text the "
                              "chat template renders (the template has no place for tool calls?); set "
                              f"model.chat_template to a template with a tool section: a built-in one ({with_tools}) "
                              "of the model's family, or a .jinja file")
        pos = at + len(function["name"])
        arguments = function.get("arguments")
        for value in (arguments.values() if isinstance(arguments, dict) else [arguments]):
            for spelled in ([value] if isinstance(value, str) else
                            [json.dumps(value, ensure_ascii=False), str(value)]):
                at = text.find(spelled, pos)
                if at >= 0:
                    pos = at + len(spelled)
                    break
    bound = len(text)
    following = _content_text(conv[i + 1]).strip() if i + 1 < len(conv) else ""
    if following:
        at = text.find(following, pos)
        bound = at if at >= 0 else bound
    j = tokens.first_token_ending_after(pos - 1) + 1 if pos > start else tokens.first_token_ending_after(start)
    while j < len(tokens.ids) and tokens.chars(j)[0] < bound:
        if tokens.ids[j] in closers:
            return j + 1
        j += 1
    return _end_of_turn(text, start, pos, tokens, special)


_CLOSER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _closer_ids(tokenizer) -> frozenset[int]:
    key = tokenizer
    if key not in _CLOSER_CACHE:
        ids = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS}
        ids = {i for i in ids if i is not None and i != tokenizer.unk_token_id}
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        _CLOSER_CACHE[key] = frozenset(ids)
    return _CLOSER_CACHE[key]


_SPECIAL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_ids(tokenizer) -> frozenset[int]:
    key = tokenizer
    if key not in _SPECIAL_CACHE:
        # Added tokens count too: some tokenizers do not flag their end-of-turn token as special.
        ids = set(tokenizer.all_special_ids)
        ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if str(t).strip()}
        _SPECIAL_CACHE[key] = frozenset(ids)
    return _SPECIAL_CACHE[key]
