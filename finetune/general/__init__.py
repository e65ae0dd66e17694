"""General prompts and text shipped with the package (SOURCE.md: what they are, their licence), and the base model's
own greedy answers to those prompts, cached beside the stage that asked for them.

Two users: eval's forgetting check (finetune.eval_forgetting: ``PROMPTS`` and ``TEXT``) and prepare's replay
(data.mix.general: ``REPLAY_PROMPTS``, finetune.data.replay). Each set of answers is keyed by ``answers_key``: the base
model's files (small files by content, weight files by name and size), the prompts, the chat template and the
generation settings; a cache whose key differs is generated again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PROMPTS = HERE / "prompts.jsonl"                # the forgetting check's prompts
REPLAY_PROMPTS = HERE / "replay_prompts.jsonl"  # replay's prompts (none shared with PROMPTS)
TEXT = HERE / "text.jsonl"                      # the forgetting check's general text
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def read_lines(path: Path, key: str) -> list[str]:
    """The ``key`` field of every row of a shipped JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def answers_key(base_dir: Path, prompts: list[str], *, template: str, max_new_tokens: int, reasoning: str) -> str:
    """What the base model's greedy answers depend on. Weight files count by name and size (hashing gigabytes on
    every eval would cost more than generating the answers); everything else in the folder by content."""
    from finetune.run import runs

    files: dict[str, Any] = {}
    for p in sorted(Path(base_dir).iterdir()):
        if p.is_file():
            files[p.name] = p.stat().st_size if p.suffix in WEIGHT_SUFFIXES else runs.file_fingerprint(p)
    return runs.fingerprint_json({"files": files, "prompts": prompts, "template": template,
                                  "max_new_tokens": max_new_tokens, "reasoning": reasoning})


def base_answers(model, tokenizer, prompts: list[str], *, key: str, cached: Path | None, device: str,
                 max_new_tokens: int, reasoning: str, batch_size: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """The base model's greedy answer to each prompt (a one-turn user conversation rendered with the chat template):
    {"prompt", "rendered", "answer" (read back: reasoning apart), "raw" (as generated, special tokens kept),
    "finish_reason"} each. Read from ``cached`` (a JSON file an earlier run wrote)
    when its key is ``key``; otherwise generated (finetune.eval_models.generate)."""
    from finetune import eval_models
    from finetune.data.render import prompt_text

    stored = cached_answers(cached, key, len(prompts))
    if stored is not None:
        return stored
    rendered = [prompt_text(tokenizer, [{"role": "user", "content": p}], reasoning=reasoning) for p in prompts]
    outs = eval_models.generate(model, tokenizer, rendered, device=device, max_new_tokens=max_new_tokens,
                                temperature=0.0, batch_size=batch_size, seed=seed)
    template = tokenizer.chat_template or ""
    end_tokens = tuple(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)
    answers = []
    for p, r, o in zip(prompts, rendered, outs, strict=True):
        read = eval_models.read_answer(o, template, None, end_tokens)
        answers.append({"prompt": p, "rendered": r, "answer": read["text"], "raw": o["text"],
                        "finish_reason": o["finish_reason"]})
    return answers


def cached_answers(cached: Path | None, key: str, n: int) -> list[dict[str, Any]] | None:
    """The answers stored in ``cached`` when they were generated for ``key`` (``n`` of them); None otherwise."""
    if cached is None or not cached.is_file():
        return None
    try:
        stored = json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: generate again
    answers = stored.get("answers") if isinstance(stored, dict) and stored.get("key") == key else None
    return answers if isinstance(answers, list) and len(answers) == n else None


def write_answers(path: Path, key: str, answers: list[dict[str, Any]]) -> None:
    """Store answers for ``base_answers`` to read back (atomically)."""
    from finetune.run import runs

    runs.atomic_write_json(path, {"key": key, "answers": answers})
