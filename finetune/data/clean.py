"""Cleaning: normalise text, reject unusable conversations, drop exact and near duplicates.

Near duplicates use MinHash over word 3-gram shingles of the lower-cased text with ``datasketch``'s LSH
index to find candidates, each confirmed by the estimated Jaccard similarity. The system prompt is left out
of the comparison: it is usually the same in every row and would make all rows look alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finetune.data.example import Example
from finetune.data.formats import RowError
from finetune.data.load import Dropped, excerpt

# Control characters except tab and newline (NFKC does not remove them).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORDS = re.compile(r"\w+")


def normalize_text(text: str, *, unicode: bool = True, whitespace: bool = True) -> str:
    if unicode:
        text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
        text = _CONTROL.sub("", text)
    if whitespace:
        # Leading indentation is kept (code); runs of spaces inside a line and trailing spaces are not.
        text = "\n".join(_INNER_SPACES.sub(" ", line).rstrip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
    return text


def clean_example(example: dict[str, Any], *, unicode: bool, whitespace: bool, require_assistant_last: bool,
                  system_prompt: str | None, prompt_only: bool = False) -> tuple[dict[str, Any], dict[str, bool]]:
    """Normalised copy of one example and what was changed ({"normalized": ..., "system_prompt_added": ...,
    "roles_mapped": {"human->user": 1, ...}, and, when there were any, "numbers_as_text":
    {"completion": 1}}: the role names ``formats.to_example`` mapped and the numbers it read as text, by field).

    Raises RowError for empty turns, a conversation without a user or assistant turn, a system message that
    is not first, or one that does not end with an assistant turn (when required).

    ``prompt_only`` (reward-driven training): a conversation that ends with the turn the model answers (user or
    tool) is kept as a prompt-only row, ``"prompt_only": True``, and so is a row of the prompt format; without it
    such a row is refused as before (no_assistant_turn, not_ending_with_assistant, prompt_only).
    """
    if "text" in example:
        text = normalize_text(example["text"], unicode=unicode, whitespace=whitespace)
        if not text:
            raise RowError("empty_text", "the text is empty")
        return {"text": text}, {"normalized": text != example["text"], "system_prompt_added": False, "roles_mapped": {},
                                **_numbers(example)}
    changed = False
    msgs = []
    for i, m in enumerate(example["messages"]):
        content = normalize_text(m["content"], unicode=unicode, whitespace=whitespace)
        changed |= content != m["content"]
        if not content.strip() and not m.get("tool_calls"):  # a turn that only calls tools has no text
            if m["role"] == "system":  # an empty system prompt is no system prompt
                continue
            raise RowError("empty_turn", f"message {i} ({m['role']}) is empty")
        msg = {**m, "content": content}
        if "reasoning_content" in m:
            reasoning = normalize_text(m["reasoning_content"], unicode=unicode, whitespace=whitespace)
            changed |= reasoning != m["reasoning_content"]
            msg["reasoning_content"] = reasoning
        msgs.append(msg)
    roles = [m["role"] for m in msgs]
    if "system" in roles[1:]:
        raise RowError("system_not_first", f"a system message at position {roles.index('system', 1)}; it must come first")
    if "user" not in roles:
        raise RowError("no_user_turn", "the conversation has no user turn")
    flagged = bool(example.get("prompt_only"))  # the prompt format: never a reply
    if flagged and roles[-1] == "assistant":
        raise RowError("reply_in_prompt", "the prompt ends with an assistant turn; a prompt-only row ends with the "
                                          "turn the model answers (a reply goes in a completion column)")
    if flagged and not prompt_only:
        raise RowError("prompt_only", "a prompt-only row (no reply to train on)")
    is_prompt = prompt_only and roles[-1] != "assistant"
    if not is_prompt and "assistant" not in roles:
        raise RowError("no_assistant_turn", "the conversation has no assistant turn")
    if not is_prompt and require_assistant_last and roles[-1] != "assistant":
        raise RowError("not_ending_with_assistant", f"the last turn is {roles[-1]!r}, not 'assistant'")
    added = False
    if system_prompt and roles[0] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
        added = True
    out: dict[str, Any] = {"messages": msgs}
    if is_prompt:
        out["prompt_only"] = True
    if example.get("tools"):
        out["tools"] = example["tools"]
    if "rejected" in example:  # a preference pair: the rejected conversation is cleaned the same way
        rejected, rej_changes = clean_example({"messages": example["rejected"]}, unicode=unicode, whitespace=whitespace,
                                              require_assistant_last=True, system_prompt=system_prompt)
        changed |= rej_changes["normalized"]
        if rejected["messages"] == msgs:
            raise RowError("identical_pair", "the chosen reply equals the rejected one: nothing to prefer")
        out["rejected"] = rejected["messages"]
    if "desirable" in example:
        out["desirable"] = bool(example["desirable"])
    return out, {"normalized": changed, "system_prompt_added": added,
                 "roles_mapped": dict(example.get("roles_mapped", {})), **_numbers(example)}


def _numbers(example: dict[str, Any]) -> dict[str, Any]:
    """{"numbers_as_text": {field: n}} when ``formats.to_example`` read numbers as text, else nothing."""
    return {"numbers_as_text": dict(example["numbers_as_text"])} if example.get("numbers_as_text") else {}


def dedupe_text(example: dict[str, Any]) -> str:
    """The text two rows are compared on: every turn except the system prompt, with its role."""
    if "text" in example:
        return example["text"]
    text = "\x1e".join(f"{m['role']}\x1f{_turn_text(m)}" for m in example["messages"] if m["role"] != "system")
    if "rejected" in example:  # pairs with one prompt and one chosen reply but other rejected replies differ
        text += "\x1d" + _turn_text(example["rejected"][-1])
    if "desirable" in example:
        text += "\x1d" + ("desirable" if example["desirable"] else "undesirable")
    if example.get("extra_columns"):  # rows that differ only in what the rewards check are different rows
        text += "\x1d" + json.dumps(example["extra_columns"], sort_keys=True, ensure_ascii=False, default=str)
    return text


def prompt_text(example: dict[str, Any]) -> str | None:
    """A preference row's prompt (every turn before the final reply), compared to keep a prompt's pairs in one
    split; None for other rows."""
    if "rejected" not in example and "desirable" not in example:
        return None
    return "\x1e".join(f"{m['role']}\x1f{_turn_text(m)}" for m in example["messages"][:-1] if m["role"] != "system")


def _turn_text(message: dict[str, Any]) -> str:
    """A turn's compared text: its reasoning, content and tool calls (two rows that call different tools with
    the same words are different rows)."""
    import json

    parts = [message.get("reasoning_content", ""), message["content"]]
    parts += [json.dumps(c["function"], sort_keys=True, ensure_ascii=False) for c in message.get("tool_calls", [])]
    return " ".join(p for p in parts if p)


def exact_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class NearIndex:
    """MinHash LSH over word 3-gram shingles; ``add`` and ``query`` by key."""

    def __init__(self, threshold: float, num_perm: int = 64):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[str, Any] = {}

    def signatures(self, texts: Sequence[str]) -> list[Any]:
        """One LeanMinHash per text, for datasketch's LSH. The signature is datasketch's own "affine32"
        scheme (fmix32 pre-mix, then a*h+b mod 2^32 with its seed-1 permutations), computed for many rows in
        one numpy pass: feeding MinHash objects row by row cost ~10x more CPU than tokenizing the rows."""
        import numpy as np
        from datasketch import LeanMinHash, MinHash

        a, b = (np.asarray(p, dtype=np.uint32) for p in MinHash(num_perm=self.num_perm, seed=1).permutations)
        out: list[Any] = []
        for start in range(0, len(texts), 256):  # small chunks keep the (grams x num_perm) array in cache: 3x faster
            grams, counts = shingle_hashes(texts[start: start + 256])
            phv = np.multiply.outer(_fmix32(grams), a)  # uint32 arithmetic wraps: that is the mod 2^32
            phv += b
            firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out += [LeanMinHash(seed=1, hashvalues=row, scheme="affine32")
                    for row in np.minimum.reduceat(phv, firsts, axis=0)]
        return out

    def add(self, key: str, sig: Any) -> None:
        self.sigs[key] = sig
        self.lsh.insert(key, sig, check_duplication=False)

    def query(self, sig: Any) -> tuple[str, float] | None:
        """The most similar indexed key at or above the threshold, with its estimated Jaccard similarity."""
        best = None
        for key in self.lsh.query(sig):
            sim = sig.jaccard(self.sigs[key])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best


def shingle_hashes(texts: Sequence[str], n: int = 3) -> tuple[Any, list[int]]:
    """32-bit hashes of each text's word n-grams (lower-cased), all texts concatenated, and the count per text.

    A word is hashed once (crc32, deterministic across processes unlike Python's hash()); an n-gram hash
    combines its words' hashes with odd multipliers. A text shorter than n words is one gram of its words.
    """
    import numpy as np

    cache = _WORD_HASHES
    words: list[int] = []
    lengths: list[int] = []
    for text in texts:
        ws = _WORDS.findall(text.lower())
        for w in ws:
            h = cache.get(w)
            if h is None:
                h = cache[w] = zlib.crc32(w.encode())
            words.append(h)
        if len(ws) < n:  # pad with zero hashes: the gram is then the combination of the real words only
            words += [0] * (n - len(ws))
        lengths.append(max(len(ws), n))
    if len(cache) > 1_000_000:  # bound memory on huge vocabularies
        cache.clear()
    w = np.asarray(words, dtype=np.uint32)
    grams = np.zeros(len(w), dtype=np.uint32)
    for k in range(n):  # gram at i combines words i .. i+n-1 (uint32 arithmetic wraps)
        grams[: len(w) - k] += w[k:] * np.uint32(_GRAM_MULTIPLIERS[k])
    lens = np.asarray(lengths)
    starts = np.cumsum(lens) - lens
    position = np.arange(len(w)) - np.repeat(starts, lens)
    keep = position <= np.repeat(lens - n, lens)  # no gram runs into the next text
    return grams[keep], [ln - n + 1 for ln in lengths]


_WORD_HASHES: dict[str, int] = {}
_GRAM_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer (what datasketch applies before its affine32 permutations)."""
    import numpy as np

    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


# ------------------------------------------------------------------------------------ prepare's rows
def drop_duplicates(examples: list[Example], *, exact: bool, near: bool, near_threshold: float,
                    need_signatures: bool, dropped: list[Dropped]) -> tuple[list[Example], Counter[str]]:
    """Drop exact, then near duplicates; give every example its key, group and MinHash signature.

    Rows of explicit test/validation sources are seen first, so the copy that survives is the evaluation one.
    ``exact``/``near``: data.clean.dedupe / near_dedupe; ``need_signatures``: compute the MinHash signatures even
    when near-dedupe is off (the leakage check compares them). Every dropped row is appended to ``dropped``.
    """
    priority = {"test": 0, "validation": 1, "all": 2, "train": 3}
    examples.sort(key=lambda e: priority[e.role])  # stable: file order within a role
    texts = [dedupe_text(e.example) for e in examples]
    for e, t in zip(examples, texts, strict=True):
        e.key = exact_key(t)
        if not e.group:
            e.group = f"r:{e.key}"  # without a group column, identical rows form a group: one split
    deduped: Counter[str] = Counter({"exact": 0, "near": 0})
    if exact:
        first: dict[str, str] = {}
        keep = []
        for e, t in zip(examples, texts, strict=True):
            if e.key in first:
                dropped.append(Dropped(e.origin, "exact_duplicate", f"same as {first[e.key]}", excerpt(e.example)))
                deduped["exact"] += 1
                continue
            first[e.key] = e.origin
            keep.append((e, t))
        examples, texts = [e for e, _ in keep], [t for _, t in keep]
    if not (near or need_signatures):
        return examples, deduped
    index = NearIndex(near_threshold)
    for e, sig in zip(examples, index.signatures(texts), strict=True):
        e.sig = sig  # the leakage check needs them even when near-dedupe is off
    if not near:
        return examples, deduped
    kept: list[Example] = []
    by_key: dict[str, Example] = {}
    for e in examples:
        hit = index.query(e.sig)
        if hit is not None:
            dropped.append(Dropped(e.origin, "near_duplicate", f"{hit[1]:.2f} similar to {by_key[hit[0]].origin}",
                                   excerpt(e.example)))
            deduped["near"] += 1
            continue
        index.add(e.key, e.sig)
        by_key[e.key] = e
        kept.append(e)
    return kept, deduped
