"""Replay against forgetting (data.mix.general): general chat rows blended into the training split.

The rows are self-distilled: the base model's own greedy answers (at most REPLAY_TOKENS tokens) to the general
prompts shipped in finetune/general/replay_prompts.jsonl, which share no prompt with the forgetting check's. Training
on them pulls the fine-tuned model towards what the base answered before, on the kind of request the task data never
shows. Answers cut at REPLAY_TOKENS are left out (training on them would teach the model to stop mid-sentence). The
answers are generated once per base model and cached in prepare's folder (finetune.general.answers_key).

``pick`` chooses which replay rows join the training split, deterministically from the seed: ``fraction`` x
training rows of them, each replay row once before any repeats. Validation and test never get replay rows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import general
from finetune.data.clean import exact_key
from finetune.data.example import Example, row_kind
from finetune.errors import UserError

REPLAY_TOKENS = 128
CACHE_NAME = "replay_answers.json"


def blend(train: list[Example], tokenizer, render: Callable[[list[Example]], list[Example]], *, fraction: float,
          base_dir: Path, device: str, load_model: Callable[[], Any], reasoning: str, cache_from: Path | None,
          cache_to: Path, seed: int) -> dict[str, Any]:
    """Add ``fraction`` x len(train) replay rows to ``train`` (in place), rendered by ``render`` as the task rows
    were; returns what was done, for prepare's report and manifest (``note``: the same in one line)."""
    kind = row_kind(train[0].example)
    if kind != "sft":
        raise UserError(f"data.mix.general: replay adds chat rows, and this run's rows are {kind} (preference data); "
                        "set data.mix.general: 0")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data.mix.general: replay rows are conversations and the tokenizer has no chat template; set "
                        "data.mix.general: 0, or model.chat_template")
    rows, info = conversations(base_dir, tokenizer, load_model=load_model, device=device, reasoning=reasoning,
                               cache_from=cache_from, cache_to=cache_to, seed=seed)
    rows = render(rows)
    chosen = pick(rows, fraction, len(train), seed)
    task_rows = len(train)
    train += chosen
    distinct = len({e.key for e in chosen})
    note = (f"data.mix.general {fraction}: {len(chosen)} replay rows (the base model's own answers to general prompts, "
            f"{distinct} distinct of {len(rows)} usable) added to the {task_rows} training rows")
    return {"general": fraction, **info, "usable": len(rows), "task_train_rows": task_rows, "rows_added": len(chosen),
            "distinct_rows_added": distinct, "note": note}


def conversations(base_dir: Path, tokenizer, *, load_model, device: str, reasoning: str, cache_from: Path | None,
                  cache_to: Path, seed: int) -> tuple[list[Example], dict[str, Any]]:
    """The replay rows (one-turn conversations with the base model's finished answers) as prepare's examples, and
    what was done (answers generated or read from the cache, answers left out). ``load_model``: called only when
    the answers must be generated (no cache for this base model)."""
    prompts = general.read_lines(general.REPLAY_PROMPTS, "prompt")
    key = general.answers_key(base_dir, prompts, template=getattr(tokenizer, "chat_template", None) or "",
                              max_new_tokens=REPLAY_TOKENS, reasoning=reasoning)
    answers = general.cached_answers(cache_from / CACHE_NAME if cache_from else None, key, len(prompts))
    cached = answers is not None
    if answers is None:
        model = load_model()
        answers = general.base_answers(model, tokenizer, prompts, key=key, cached=None, device=device,
                                       max_new_tokens=REPLAY_TOKENS, reasoning=reasoning, seed=seed)
        del model
    general.write_answers(cache_to / CACHE_NAME, key, answers)
    rows = []
    for i, a in enumerate(answers):
        if a["finish_reason"] != "stop" or not a["answer"].strip():
            continue
        example = {"messages": [{"role": "user", "content": a["prompt"]},
                                {"role": "assistant", "content": a["answer"]}]}
        rows.append(Example(example, f"{general.REPLAY_PROMPTS.name}:{i + 1} (base model's answer)", -1, "train",
                            "", key=exact_key("replay:" + a["prompt"]), split="train"))
    return rows, {"prompts": len(prompts), "answers_cached": cached, "answers_cut": len(prompts) - len(rows),
                  "answer_max_tokens": REPLAY_TOKENS}


def pick(rows: list[Example], fraction: float, train_rows: int, seed: int) -> list[Example]:
    """round(fraction x train_rows) replay rows, in a seeded order: every row once before any repeats."""
    want = round(fraction * train_rows)
    if not rows or want <= 0:
        return []
    rng = random.Random(seed)
    chosen: list[Example] = []
    while len(chosen) < want:
        order = list(rows)
        rng.shuffle(order)
        chosen += order[: want - len(chosen)]
    return chosen
