"""Feedback as training data: approved and corrected replies as SFT rows, ratings and corrections as preferences.

Plain functions over the feedback store's rows (``FeedbackStore.feedback()``); the latest feedback on a reply wins.
``training_rows`` gives ``{"messages": [...]}`` rows, the format ``prepare`` reads. Only approved and corrected
replies may receive loss, so it leaves out, and says why:
- a reply rated down without a correction (it says what not to say, not what to say);
- a reply rated up that was cut at max_tokens or stopped by the user (an unfinished answer is not a good one);
- a conversation whose earlier model replies are not approved themselves, when the data will be trained with
  ``data.train_on: assistant`` or ``all`` (those earlier replies would be trained on too); with ``last_assistant``
  or ``completion`` they are context only and the row is kept;
- a row that ``prepare`` would drop (no user turn, an empty turn, a context that does not end with the user...).

``preference_rows`` gives DPO/ORPO pairs ``{"prompt", "chosen", "rejected"}`` from corrections (the better answer
chosen over the model's reply) and KTO rows ``{"prompt", "completion", "label"}``: a reply rated Good is desirable,
one rated Bad undesirable, and a correction gives both (its answer desirable, the replaced reply undesirable). A
rejected or undesirable reply is only ever pushed down: prepare trains preference rows on the final reply alone, and
SFT on rated rows takes the desirable ones only. Unfinished replies rated Good (cut or stopped) are left out; rated
Bad, they are undesirable.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

UNFINISHED = {"length": "cut_at_max_tokens", "stopped": "stopped_by_user"}
# train_on settings under which every assistant turn of a row gets loss (not only the last one)
TRAINS_EVERY_TURN = ("assistant", "all")
LEFT_OUT = {
    "rated_bad": "rated Bad without a better answer",
    "cut_at_max_tokens": "rated Good but cut at max_tokens (give a better answer to keep it)",
    "stopped_by_user": "rated Good but stopped by the user (give a better answer to keep it)",
    "unapproved_context": "earlier model replies in the conversation are not approved and train_on {train_on} would "
                          "train them too (export with --train-on last_assistant and set data.train_on: "
                          "last_assistant, or rate those replies)",
    "duplicate": "the same conversation and answer twice",
    "unrated": "neither rated nor corrected",
    "identical_pair": "corrected to the same answer (nothing to prefer)",
}

def training_rows(feedback: list[dict[str, Any]], *, train_on: str = "assistant"
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Approved and corrected replies as {"messages": [...]} rows (latest feedback per reply wins).

    train_on: how the rows will be trained (prepare's data.train_on). Returns the rows and
    {"approved": n, "corrected": n, "left_out": {reason: n}} (reasons: LEFT_OUT keys and prepare's drop reasons).
    """
    from finetune.data.clean import clean_example
    from finetune.data.formats import RowError

    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:  # oldest first, so later feedback on the same reply replaces earlier
        key = item["completion_id"] or f"row-{item['id']}"
        latest[key] = item

    def approved(item: dict[str, Any]) -> str | None:
        """The answer this feedback approves (the reply or its correction), or None."""
        if item["correction"]:
            return item["correction"]
        if item["rating"] == "up" and item.get("finish_reason") not in UNFINISHED:
            return item["reply"]
        return None

    # Replies approved as they stand, by (conversation before them, text): an earlier model turn inside a later
    # conversation may be trained only if it is one of these.
    good_turns = {_turn_key(item["messages"], item["reply"]) for item in latest.values()
                  if approved(item) == item["reply"]}
    rows, seen = [], set()
    stats: dict[str, Any] = {"approved": 0, "corrected": 0, "left_out": Counter()}
    for item in latest.values():
        answer = approved(item)
        if answer is None:
            reason = "rated_bad" if item["rating"] == "down" or item["rating"] is None else \
                UNFINISHED[item["finish_reason"]]
            stats["left_out"][reason] += 1
            continue
        context = item["messages"]
        earlier = [i for i, m in enumerate(context) if m["role"] == "assistant"]
        if train_on in TRAINS_EVERY_TURN and any(
                _turn_key(context[:i], context[i]["content"]) not in good_turns for i in earlier):
            stats["left_out"]["unapproved_context"] += 1
            continue
        messages = context + [{"role": "assistant", "content": answer}]
        try:  # the row must be one prepare keeps: the same checks, with prepare's default cleaning
            clean_example({"messages": messages}, unicode=True, whitespace=True, require_assistant_last=True,
                          system_prompt=None)
            if not context or context[-1]["role"] != "user":
                raise RowError("context_not_ending_with_user", "the reply does not answer a user message")
        except RowError as exc:
            stats["left_out"][exc.reason] += 1
            continue
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key in seen:
            stats["left_out"]["duplicate"] += 1
            continue
        seen.add(key)
        stats["corrected" if item["correction"] else "approved"] += 1
        rows.append({"messages": messages})
    stats["left_out"] = dict(stats["left_out"])
    return rows, stats


def preference_rows(feedback: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                              dict[str, Any]]:
    """(DPO pairs from corrections, KTO rows from ratings and corrections, stats); latest feedback per reply wins."""
    from finetune.data.clean import clean_example
    from finetune.data.formats import RowError

    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:
        latest[item["completion_id"] or f"row-{item['id']}"] = item
    pairs: list[dict[str, Any]] = []
    rated: list[dict[str, Any]] = []
    seen: set[str] = set()
    stats: dict[str, Any] = {"pairs": 0, "desirable": 0, "undesirable": 0, "left_out": Counter()}

    def usable(context: list[dict[str, str]], answer: str) -> str | None:
        """prepare's reason to drop context + answer, or None."""
        try:
            clean_example({"messages": context + [{"role": "assistant", "content": answer}]}, unicode=True,
                          whitespace=True, require_assistant_last=True, system_prompt=None)
            if not context or context[-1]["role"] != "user":
                raise RowError("context_not_ending_with_user", "the reply does not answer a user message")
        except RowError as exc:
            return exc.reason
        return None

    def add_rated(context, answer: str, good: bool) -> None:
        key = json.dumps([context, answer, good], sort_keys=True, ensure_ascii=False)
        if key in seen:
            stats["left_out"]["duplicate"] += 1
            return
        seen.add(key)
        rated.append({"prompt": context, "completion": [{"role": "assistant", "content": answer}], "label": good})
        stats["desirable" if good else "undesirable"] += 1

    for item in latest.values():
        context, reply, correction = item["messages"], item["reply"], item["correction"]
        if correction:
            why = usable(context, correction) or usable(context, reply)
            if why is None and " ".join(correction.split()) == " ".join(reply.split()):
                why = "identical_pair"
            if why is not None:
                stats["left_out"][why] += 1
                continue
            pairs.append({"prompt": context, "chosen": [{"role": "assistant", "content": correction}],
                          "rejected": [{"role": "assistant", "content": reply}]})
            stats["pairs"] += 1
            add_rated(context, correction, True)
            add_rated(context, reply, False)
            continue
        if item["rating"] == "up" and item.get("finish_reason") in UNFINISHED:
            stats["left_out"][UNFINISHED[item["finish_reason"]]] += 1
            continue
        if item["rating"] not in ("up", "down"):
            stats["left_out"]["unrated"] += 1
            continue
        why = usable(context, reply)
        if why is not None:
            stats["left_out"][why] += 1
            continue
        add_rated(context, reply, item["rating"] == "up")
    stats["left_out"] = dict(stats["left_out"])
    return pairs, rated, stats


def _turn_key(context: list[dict[str, str]], reply: str) -> str:
    return json.dumps([context, reply], sort_keys=True, ensure_ascii=False)


def left_out_text(left_out: dict[str, int], train_on: str) -> str:
    """'2 rated Bad without a better answer; 1 ...' (prepare's drop reasons as they are)."""
    if not left_out:
        return "nothing left out"
    return "; ".join(f"{n} {LEFT_OUT.get(reason, reason.replace('_', ' ')).format(train_on=train_on)}"
                     for reason, n in sorted(left_out.items(), key=lambda kv: -kv[1]))
