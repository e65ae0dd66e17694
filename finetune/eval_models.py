"""The models eval compares, and what it asks of them: loading, loss on a tokenized split, generation.

Plain functions, no recipe. The transformers column: ``load_causal_lm`` (the base, on a 4-bit base for a QLoRA
adapter as in training), ``attach_finetuned`` (the adapter over it, or the full model), ``dataset_loss`` (mean
next-token loss on the trained tokens) and ``generate`` (batched, left padded, greedy at temperature 0). The GGUF
column: ``gguf_generate`` through the server's own llama.cpp worker in a child process. ``read_answer`` reads
every reply back the same way, whichever model wrote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import hardware
from finetune import metrics as metric_lib
from finetune.data.render import IGNORE_INDEX
from finetune.errors import UserError

LOSS_TOKENS_PER_BATCH = 4096  # logits are tokens x vocab floats: bound the memory of one forward pass


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded for eval: as train loaded it (model.dtype, attention), on this device."""
    device: str
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str = "auto"
    four_bit: bool = False  # a QLoRA adapter: evaluate it on the same 4-bit base it was trained on (CUDA only)


# ------------------------------------------------------------------------------------------------ loading
def load_causal_lm(path: Path, options: LoadOptions):
    """A causal LM from a local folder, in eval mode."""
    from finetune import models

    quantization = models.four_bit_config(options.dtype) if options.four_bit and options.device == "cuda" else None
    resolved = models.ResolvedModel(Path(path), str(path), "local", None)
    model = models.load_model(resolved, options.dtype, device=options.device,
                              trust_remote_code=options.trust_remote_code,
                              attn_implementation=options.attn_implementation, quantization_config=quantization)
    model.eval()
    return model


def attach_finetuned(base_model, options: LoadOptions, adapter_dir: Path | None, full_dir: Path | None):
    """The fine-tuned model: the adapter train wrote over ``base_model``, or (full fine-tuning) its model."""
    if adapter_dir is not None:
        from peft import PeftModel

        if not adapter_dir.exists():
            raise UserError(f"{adapter_dir}: the adapter train recorded is missing. Run `finetune train RECIPE` again.")
        model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    elif full_dir is not None:
        if not full_dir.exists():
            raise UserError(f"{full_dir}: the model train recorded is missing. Run `finetune train RECIPE` again.")
        del base_model
        model = load_causal_lm(full_dir, options)
    else:
        raise UserError("the train manifest names neither an adapter nor a model. Run `finetune train RECIPE` again.")
    model.eval()
    return model


def load_tokenized(path: Path, limit: int | None) -> list[tuple[Any, Any]]:
    """(input ids, labels) of a tokenized split prepare wrote (its first ``limit`` rows), as the loss reads them:
    views into the split's buffers (finetune.data.tokenized)."""
    from finetune.data import tokenized

    ds = tokenized.load(path)
    rows = tokenized.rows(ds)
    if "desirable" in ds.column_names:  # rated rows (KTO's shape): the loss is on the desirable replies only
        rows = [r for r, good in zip(rows, ds["desirable"], strict=True) if good]
    return rows[:limit] if limit else rows



# ------------------------------------------------------------------------------------------------- loss
def dataset_loss(model, rows: list[tuple[Any, Any]], device: str) -> dict[str, Any]:
    """Mean next-token loss over the labelled tokens (labels != -100) of (input ids, labels) rows, as in training;
    per-example means too."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    nll = [0.0] * len(rows)
    count = [0] * len(rows)
    batch: list[int] = []

    def flush(idx: list[int]) -> None:
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(rows[i][0])
            # a writable int64 copy: the rows are read-only views of the memory-mapped split
            ids[j, :n] = torch.from_numpy(np.array(rows[i][0], dtype=np.int64))
            labels[j, :n] = torch.from_numpy(np.array(rows[i][1], dtype=np.int64))
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = shift_labels != IGNORE_INDEX
        for j, i in enumerate(idx):
            nll[i] = float(losses[j][valid[j]].sum())
            count[i] = int(valid[j].sum())

    for i in order:
        if batch and (len(batch) + 1) * len(rows[i][0]) > LOSS_TOKENS_PER_BATCH:
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    total = sum(count)
    loss = sum(nll) / total if total else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if total and loss < 50 else float("inf"), "tokens": total,
            "per_example": [nll[i] / count[i] if count[i] else float("nan") for i in range(len(rows))]}



# ------------------------------------------------------------------------------------------- generation
def generate(model, tokenizer, prompts: list[str], *, device: str, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int) -> list[dict[str, Any]]:
    """Batched generation with left padding; greedy when temperature is 0. One {"text", "finish_reason"} each;
    the text keeps special tokens (reasoning and tool-call markers: read_answer takes it apart)."""
    import torch

    torch.manual_seed(seed)
    stop_ids = stop_ids_of(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    # Longest prompts first: similar lengths share a batch (less padding) and memory trouble shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device), **kwargs)
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for j, i in enumerate(idx):
                tokens = new[j]
                stop_at = next((k for k, t in enumerate(tokens) if t in stop_ids), None)
                kept = tokens if stop_at is None else tokens[:stop_at]
                results[i] = {"text": tokenizer.decode(kept, skip_special_tokens=False).strip(),
                              "finish_reason": "length" if stop_at is None else "stop", "tokens": len(kept)}
    finally:
        tokenizer.padding_side = old_side
    return results  # type: ignore[return-value]



def stop_ids_of(model, tokenizer) -> list[int]:
    """The token ids that end a reply of ``model`` (models.stop_ids with the model's configured EOS ids)."""
    from finetune import models

    ids = models.stop_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not ids:
        raise UserError("the tokenizer has no end-of-sequence token: generation could not stop")
    return ids



GGUF_MAX_PROCESSES = 4  # eval's GGUF column: worker processes at most (each holds its own context and buffers)


def gguf_processes(path: Path, n_examples: int) -> int:
    """How many llama.cpp workers eval's GGUF column runs at once: one per core (one thread each decodes faster in
    all than one process whose threads wait on each other, and far faster on a busy machine:
    scripts/bench_export.py), at most GGUF_MAX_PROCESSES, no more than there are examples, and only as many as
    half the free memory holds if each loaded its own copy of the file."""
    import psutil

    size = max(1, Path(path).stat().st_size)
    by_memory = int(psutil.virtual_memory().available * 0.5 // size)
    return max(1, min(hardware.cores(), GGUF_MAX_PROCESSES, n_examples, by_memory))


def gguf_generate(path: Path, examples: list[dict[str, Any]], *, reasoning: str, max_new_tokens: int,
                  temperature: float, n_ctx: int, seed: int, processes: int = 1,
                  stall_s: float = 600.0) -> tuple[list[dict[str, Any]], str]:
    """The GGUF's raw replies (special tokens kept) to each example's conversation without its last turn, from the
    server's own worker in child processes (a native crash fails this column, not eval): the same rendering of
    tools and reasoning as `finetune serve`. ``processes`` workers answer at once, each with its share of the
    cores (the weights are memory-mapped, so the workers share one copy); an example's reply does not depend on
    which worker answers it. Returns (replies, the GGUF's chat template)."""
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from finetune import eval_reward
    from finetune.gguf.client import Worker

    processes = max(1, min(processes, len(examples)))
    workers = [Worker({"gguf": str(path), "n_ctx": n_ctx, "chat_template": None, "reasoning": reasoning,
                       "sharing": processes}) for _ in range(processes)]
    free: queue.SimpleQueue[Worker] = queue.SimpleQueue()
    failed = threading.Event()

    def answer(i: int, ex: dict[str, Any]) -> dict[str, Any] | None:
        worker = free.get()  # one of the workers, each answering one example at a time
        try:
            if failed.is_set():  # another example failed: this column has no result
                return None
            done = worker.answer({"mode": "chat", "messages": eval_reward.prompt_messages(ex), "tools": ex.get("tools"),
                                  "max_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0, "top_k": 0,
                                  "min_p": 0.0, "seed": seed}, stall_s=stall_s)
        except Exception as exc:
            failed.set()
            raise RuntimeError(f"example {i}: {exc}") from exc
        finally:
            free.put(worker)
        return {"text": done["text"].strip(), "finish_reason": "length" if done["finish_reason"] == "length" else "stop",
                "tokens": done["completion_tokens"]}

    pool = ThreadPoolExecutor(processes)
    try:
        info = list(pool.map(Worker.start, workers))[0]
        for worker in workers:
            free.put(worker)
        outs = list(pool.map(answer, range(len(examples)), examples))
    finally:
        pool.shutdown(cancel_futures=True)
        for w in workers:
            w.stop()
    return outs, info.get("template") or ""


def read_answer(output: dict[str, Any], template: str, tools: list[dict[str, Any]] | None = None,
                end_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """A generated reply (special tokens kept) read back as the chat template wrote it: ``text`` is what the text
    metrics compare (the answer without reasoning, then the calls), ``tool_calls`` what tool_call_match compares."""
    from finetune.data.toolcalls import parse_reply

    reply = parse_reply(output["text"], template, tools=tools, end_tokens=end_tokens)
    return {"text": metric_lib.answer_text(reply.content, reply.tool_calls), "raw": output["text"],
            "reasoning": reply.reasoning, "tool_calls": reply.tool_calls, "unparsed_call": reply.unparsed,
            "finish_reason": output["finish_reason"], "tokens": output.get("tokens")}
