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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all", "last_assistant", "completion")

Messages = Sequence[dict[str, Any]]


class RenderError(ValueError):
    """A conversation the chat template cannot render (the message says which turn and why)."""


def render_messages(tokenizer, messages: Messages, *, train_on: str = "assistant",
                    max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 except on the trained tokens.

    train_on: "assistant" (every assistant turn: content + end-of-turn token), "all" (every token),
    "last_assistant" (only the final assistant turn), "completion" (everything after the prompt: the final
    assistant turn and whatever the template writes after it). max_tokens truncates from the right.
    """
    return render_batch(tokenizer, [messages], train_on=train_on, max_tokens=max_tokens)[0]


def render_batch(tokenizer, conversations: Sequence[Messages], *, train_on: str = "assistant",
                 max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """render_messages for many conversations at once (one batched tokenizer call: much faster)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not conversations:
        return []
    full = _apply(tokenizer, [list(c) for c in conversations], add_generation_prompt=False)

    # Prefix renders: messages[:i] + generation prompt for each assistant turn that gets loss.
    turn_index: list[list[int]] = []
    prefix_convs: list[list[dict[str, Any]]] = []
    for conv in conversations:
        turns = [i for i, m in enumerate(conv) if m.get("role") == "assistant"]
        if train_on in ("last_assistant", "completion"):
            turns = turns[-1:]
        elif train_on == "all":
            turns = []
        turn_index.append(turns)
        prefix_convs += [list(conv[:i]) for i in turns if i > 0]
    prefixes = iter(_apply(tokenizer, prefix_convs, add_generation_prompt=True) if prefix_convs else [])

    special = _special_ids(tokenizer)
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
                last = len(ids) if train_on == "completion" else _end_of_turn(text, start, content_end, tokens, special)
                labels[first:last] = ids[first:last]
                cursor = tokens.end_char(last - 1) if last > 0 else 0
        if max_tokens is not None and len(ids) > max_tokens:
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        out.append((ids, labels))
    return out


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


def prompt_text(tokenizer, messages: Messages) -> str:
    """The prompt a model sees to produce the final assistant turn (messages before it + generation prompt)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return _apply(tokenizer, [list(messages[:last])], add_generation_prompt=True)[0]


# ------------------------------------------------------------------------------------------------ helpers
def _apply(tokenizer, conversations: list[list[dict[str, Any]]], *, add_generation_prompt: bool) -> list[str]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise RenderError(
            "the tokenizer has no chat template; use a chat/instruct model, or set data format to 'text' for raw text"
        )
    try:
        fast = _fast_renderer(tokenizer)
        if fast is not None:
            return [fast(conv, add_generation_prompt) for conv in conversations]
        rendered = tokenizer.apply_chat_template(conversations, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises for conversations a template refuses ("roles must alternate")
        raise RenderError(f"the chat template refused the conversation: {exc}") from None
    return list(rendered)


_FAST: dict[int, Any] = {}


def _fast_renderer(tokenizer):
    """The compiled template called directly: about 3x faster than apply_chat_template, which converts every
    message on every call. Used only after it rendered a probe conversation exactly like apply_chat_template."""
    key = id(tokenizer)
    state = (tokenizer.chat_template, repr(sorted(tokenizer.special_tokens_map.items())))
    if key in _FAST and _FAST[key][0] == state:  # the same tokenizer object, unchanged
        return _FAST[key][1]
    render = None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.chat_template)
        extra = dict(tokenizer.special_tokens_map)

        def render(conv: list[dict[str, Any]], add_generation_prompt: bool) -> str:
            return compiled.render(messages=conv, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **extra)

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


_SPECIAL_CACHE: dict[int, frozenset[int]] = {}


def _special_ids(tokenizer) -> frozenset[int]:
    key = id(tokenizer)
    if key not in _SPECIAL_CACHE:
        # Added tokens count too: some tokenizers do not flag their end-of-turn token as special.
        ids = set(tokenizer.all_special_ids)
        ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if str(t).strip()}
        _SPECIAL_CACHE[key] = frozenset(ids)
    return _SPECIAL_CACHE[key]
