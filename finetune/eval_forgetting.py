"""Eval's forgetting check: what did fine-tuning cost the model outside its task? Offline, on data shipped with the
package (finetune/general/, SOURCE.md).

(a) Agreement with the base model on general prompts: the base model answers each prompt of
finetune/general/prompts.jsonl greedily (at most ANSWER_TOKENS tokens; cached in the eval folder, keyed by the base
model's files, the prompts and the chat template); then both models read prompt + that answer (teacher forcing) and
their next-token distributions are compared at every answer position: the mean KL(base || fine-tuned) in nats per
token, and top-1 agreement (the share of positions where the fine-tuned model's most likely token is the base's).
(b) Perplexity of both models on the paragraphs of finetune/general/text.jsonl.

The verdict (none / mild / strong) and its thresholds: finetune.verdict.forgetting. ``ForgettingCheck`` rides on
the models eval has already loaded: eval calls ``observe("base", model)`` and then ``observe("finetuned", model)``.
The base's log-probabilities are kept between the two passes in float16 (answer positions x vocabulary: 150 MB for
32 answers of 48 tokens over a 49k vocabulary), and the fine-tuned model's are rounded the same way before the KL,
so a model compared with itself scores exactly 0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finetune import eval_models, general

ANSWER_TOKENS = 48          # the base's greedy answers are cut here: the check stays cheap on a CPU
TOKENS_PER_BATCH = 2048     # one teacher-forced forward pass holds tokens x vocabulary logits
CACHE_NAME = "forgetting_base_answers.json"


class ForgettingCheck:
    """The forgetting check over eval's two passes. ``cache_from``: the finished eval folder (an earlier run's base
    answers); ``cache_to``: the folder eval is writing (the answers are stored there for the next run)."""

    def __init__(self, tokenizer, *, base_dir: Path, device: str, reasoning: str, cache_from: Path | None,
                 cache_to: Path, batch_size: int = 16, seed: int = 0,
                 prompts_file: Path = general.PROMPTS, text_file: Path = general.TEXT):
        self.tokenizer, self.device, self.reasoning = tokenizer, device, reasoning
        self.base_dir, self.cache_from, self.cache_to = Path(base_dir), cache_from, cache_to
        self.batch_size, self.seed = batch_size, seed
        self.prompts = general.read_lines(prompts_file, "prompt")
        self.texts = general.read_lines(text_file, "text")
        self.answers: list[dict[str, Any]] = []   # the base's answers that were scored (an empty one has no position)
        self.sequences: list[tuple[list[int], int]] = []  # (prompt + answer ids, prompt length)
        self.base_lp: list[Any] = []       # float16 log-probabilities at the answer positions
        self.base_top: list[Any] = []      # the base's most likely token there
        self.measures: dict[str, Any] = {}
        self.seconds = 0.0
        self.cached = False

    def observe(self, name: str, model) -> None:
        """Measure ``model``: "base" first (answers, log-probabilities, perplexity), then "finetuned"."""
        t0 = time.time()
        if name == "base":
            self._base(model)
        elif name == "finetuned" and self.base_lp:
            self._finetuned(model)
        self.seconds += time.time() - t0

    def result(self) -> dict[str, Any] | None:
        """metrics.json's "forgetting": the measures, per prompt and per paragraph; None before both passes."""
        if "kl" not in self.measures or not self.sequences:
            return None
        return {**self.measures, "prompts": len(self.sequences), "answer_tokens": sum(len(t) for t in self.base_top),
                "answer_max_tokens": ANSWER_TOKENS, "paragraphs": len(self.texts), "answers_cached": self.cached,
                "seconds": round(self.seconds, 2)}

    # ------------------------------------------------------------------------------------------ passes
    def _base(self, model) -> None:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        key = general.answers_key(self.base_dir, self.prompts, template=template, max_new_tokens=ANSWER_TOKENS,
                                  reasoning=self.reasoning)
        stored = general.cached_answers(self.cache_from / CACHE_NAME if self.cache_from else None, key,
                                        len(self.prompts))
        self.cached = stored is not None
        self.answers = stored if stored is not None else general.base_answers(
            model, self.tokenizer, self.prompts, key=key, cached=None, device=self.device,
            max_new_tokens=ANSWER_TOKENS, reasoning=self.reasoning, batch_size=self.batch_size, seed=self.seed)
        general.write_answers(self.cache_to / CACHE_NAME, key, self.answers)
        self.sequences, scored = [], []
        for a in self.answers:
            prompt_ids = self.tokenizer(a["rendered"], add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(a["raw"], add_special_tokens=False)["input_ids"]
            if answer_ids:
                self.sequences.append((prompt_ids + answer_ids, len(prompt_ids)))
                scored.append(a)
        self.answers = scored
        for lp in answer_logprobs(model, self.sequences, self.device):
            self.base_top.append(lp.argmax(-1))
            self.base_lp.append(lp.half())
        self.measures["text"] = {"base": self._text_loss(model)}

    def _finetuned(self, model) -> None:
        kl_sum, agree, per_prompt = 0.0, 0, []
        for i, lp in enumerate(answer_logprobs(model, self.sequences, self.device)):
            kl, top = compare(self.base_lp[i], self.base_top[i], lp)
            kl_sum, agree = kl_sum + float(kl.sum()), agree + int(top.sum())
            per_prompt.append({"prompt": self.answers[i]["prompt"], "kl": float(kl.mean()),
                               "top1_agreement": float(top.float().mean()), "tokens": len(top)})
        positions = sum(len(t) for t in self.base_top)
        self.measures["text"]["finetuned"] = self._text_loss(model)
        text = self.measures["text"]
        self.measures.update(
            kl=kl_sum / positions if positions else float("nan"),
            top1_agreement=agree / positions if positions else float("nan"),
            perplexity={name: text[name]["perplexity"] for name in ("base", "finetuned")},
            per_prompt=per_prompt)
        self.base_lp = []  # the float16 copies are no longer needed

    def _text_loss(self, model) -> dict[str, Any]:
        rows = [(ids, ids) for ids in (self.tokenizer(t)["input_ids"] for t in self.texts)]
        loss = eval_models.dataset_loss(model, rows, self.device)
        return {"loss": loss["loss"], "perplexity": loss["perplexity"], "tokens": loss["tokens"],
                "per_paragraph": loss["per_example"]}


# ------------------------------------------------------------------------------------------------ maths
def answer_logprobs(model, sequences: list[tuple[list[int], int]], device: str):
    """For each (ids, prompt length): the model's log-softmax (float32, on the CPU) at the positions that predict
    the answer tokens ids[prompt length:], in order; sequences batched up to TOKENS_PER_BATCH tokens."""
    import torch

    start = 0
    while start < len(sequences):
        end = start + 1
        while end < len(sequences) and (end - start + 1) * max(len(s[0]) for s in sequences[start:end + 1]) \
                <= TOKENS_PER_BATCH:
            end += 1
        batch = sequences[start:end]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (seq, _) in enumerate(batch):
            ids[j, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[j, :len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for j, (seq, prompt_len) in enumerate(batch):
            yield torch.log_softmax(logits[j, prompt_len - 1:len(seq) - 1].float(), dim=-1).cpu()
        del logits
        start = end


def compare(base_lp16, base_top, tuned_lp) -> tuple[Any, Any]:
    """Per answer position: KL(base || tuned) in nats (both log-probabilities as float16 values) and whether the
    tuned model's most likely token is the base's."""
    b = base_lp16.float().clamp(min=-1e4)  # float16 turns very unlikely tokens into -inf: 0 * inf is not a number
    t = tuned_lp.half().float().clamp(min=-1e4)
    kl = (b.exp() * (b - t)).sum(-1)
    return kl, tuned_lp.argmax(-1) == base_top
