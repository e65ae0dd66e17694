"""The eval stage: did fine-tuning help? Base vs fine-tuned (vs the exported GGUF) on the same held-out examples.

Reads the held-out split that prepare wrote, and the adapter (or full model) that train wrote. Every model
variant answers the SAME prompts with the SAME generation settings (batched, greedy by default): the prompt is
the conversation without its last assistant turn, rendered by the tokenizer's own chat template with the
generation prompt, with the row's tools and the recipe's reasoning setting (data.reasoning), as in training and
serving; the reference is that last assistant turn. Every answer, whichever model wrote it, is read back the same
way (finetune.data.toolcalls.parse_reply, special tokens kept): reasoning apart, the answer text, the tool calls.
Text metrics compare the answer without its reasoning (plus one canonical JSON line per tool call);
tool_call_match compares the calls (function name + JSON-equal arguments). Loss and perplexity come from the tokenized
split (loss only on the trained tokens, as in training). When export has run, the exported GGUF answers the
same prompts through llama.cpp as a third column.

Writes runs/<name>/eval/: metrics.json (one entry per model variant and a verdict), examples.jsonl (every
prompt with its reference, each model's answer and scores), report.html (self-contained: plots embedded),
loss_curves.png, metrics.png and manifest.json.

The verdict states its rules (see VERDICT_RULES): improvement needs a paired-bootstrap 95% interval of the
difference that excludes zero; over- and underfitting are read from train's log.jsonl and from the gap
between the fine-tuned model's loss on training examples and on held-out examples.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from finetune import eval_preference, runs
from finetune import metrics as metric_lib
from finetune.errors import UserError

GENERATION_METRICS = ("exact_match", "accuracy", "precision", "recall", "f1", "rouge", "bleu", "chrf",
                      "tool_call_match")
# The metric the "improved?" verdict is read from: the first of these the recipe asks for (per-example scores).
PRIMARY_ORDER = [("tool_call_match", "tool_call_match"), ("exact_match", "exact_match"), ("accuracy", "correct"), ("rouge", "rougeL"),
                 ("chrf", "chrf"), ("bleu", "bleu")]
LOSS_TOKENS_PER_BATCH = 4096  # logits are tokens x vocab floats: bound the memory of one forward pass
SATURATED_DROP = 0.01  # nats: a smaller fall over the last third of training is not "still falling"

VERDICT_RULES = {
    "improved": "Improved when the 95% paired-bootstrap interval of (fine-tuned - base) on the primary metric "
                "lies entirely above 0; worse when entirely below 0; otherwise no clear difference at this "
                "sample size. Exact-match rates also get 95% Wilson intervals.",
    "overfitting": "Overfitting when the last validation loss is more than 5% above the best one while the "
                   "training loss kept falling after the best step (train log), or when the fine-tuned model's "
                   "held-out loss exceeds its loss on training examples by more than 25% and 0.1 nats/token.",
    "underfitting": "Underfitting when the training loss is still above 70% of its first value at the end, or "
                    "when training and validation loss were both still falling at the end (the last third of "
                    "the logged training loss fell by more than 5% and 0.01 nats, and the last validation loss was the "
                    "best).",
}


# ------------------------------------------------------------------------------------------------ stage
def run(recipe, *, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """Score base, fine-tuned and (if exported) GGUF models; write metrics.json, examples.jsonl, report.html."""
    import torch

    from finetune import eval_report, pipeline

    cfg = recipe.eval
    prepared = pipeline.require_fresh(recipe, "prepare", recipe_path)
    trained = pipeline.require_fresh(recipe, "train", recipe_path)
    exported = runs.read_manifest(recipe.run_dir("export"))
    if exported is not None and cfg.gguf:
        try:
            pipeline.require_fresh(recipe, "export", recipe_path)
        except UserError as exc:
            raise UserError(f"{exc}; or score without the GGUF: eval.gguf=false") from None

    split_file = _stage_path(prepared, ("splits", cfg.split), recipe.run_dir("prepare") / "splits" / f"{cfg.split}.jsonl")
    rows = read_jsonl(split_file)
    if not rows:
        other = "validation" if cfg.split == "test" else "test"
        raise runs.NothingToDo(f"the {cfg.split} split is empty ({split_file} has no rows). To get one: set "
                               f"data.split.{cfg.split} (e.g. 0.1) or add a source with role: {cfg.split}, then run "
                               f"`finetune prepare {recipe_path}`; or score the other split: eval.split={other}.")
    # rated rows (KTO's shape): only a desirable reply is a reference answer
    examples = [r for r in rows if _is_chat_example(r) and r.get("desirable") is not False][: cfg.max_examples]
    gen_names = [m for m in cfg.metrics if m in GENERATION_METRICS]
    want_loss = any(m in cfg.metrics for m in ("loss", "perplexity"))
    if gen_names and not examples:
        raise UserError(
            f"{split_file}: no conversation ending in an assistant turn to score ({len(rows)} rows). Generation "
            f"metrics ({', '.join(gen_names)}) need chat rows; for raw text use eval.metrics: [loss, perplexity]."
        )
    tok_split = _stage_path(prepared, ("tokenized", cfg.split), recipe.run_dir("prepare") / "tokenized" / cfg.split)
    tok_train = _stage_path(prepared, ("tokenized", "train"), recipe.run_dir("prepare") / "tokenized" / "train")
    pref_rows = eval_preference.read_rows(tok_split, cfg.max_examples)  # None unless the split holds preferences

    device = "cuda" if torch.cuda.is_available() else "cpu"
    outputs = trained.get("outputs", {})
    method = outputs.get("method") or recipe.train.method
    adapter_dir = Path(outputs["adapter"]) if outputs.get("adapter") else None
    full_dir = Path(outputs["model"]) if outputs.get("model") else None
    base_path = Path(outputs.get("base_model") or _resolve_base(recipe).path)
    tokenizer = _load_tokenizer(adapter_dir or full_dir or base_path, recipe.model.trust_remote_code,
                                recipe.chat_template_path())
    reasoning = recipe.data.reasoning
    prompts = [render_prompt(tokenizer, ex["messages"][:-1], tools=ex.get("tools"), reasoning=reasoning)
               for ex in examples]
    reference_calls = [metric_lib.canonical_calls(ex["messages"][-1].get("tool_calls")) for ex in examples]
    references = [metric_lib.answer_text(ex["messages"][-1]["content"], calls)
                  for ex, calls in zip(examples, reference_calls, strict=True)]
    template = tokenizer.chat_template or ""
    end_tokens = tuple(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
                      seed=recipe.seed)

    runs.make_dir(recipe.run_dir())
    with runs.StageRun(recipe, "eval", inputs={
        "prepare": runs.fingerprint_json(prepared), "train": runs.fingerprint_json(trained),
        "export": runs.fingerprint_json(exported) if exported else None, "split": str(split_file),
    }, upstream={"prepare": prepared, "train": trained, "export": exported}, aside=True) as stage:
        variants: dict[str, dict[str, Any]] = {}
        answers: dict[str, list[dict[str, Any]]] = {}
        per_example_loss: dict[str, list[float]] = {}
        pref_logps: dict[str, list[tuple[float, int]]] = {}

        print(f"eval: {len(examples)} {cfg.split} examples, {device}, base model {base_path}")
        model = _load_causal_lm(base_path, recipe, device, method)
        for name in ("base", "finetuned"):
            if name == "finetuned":
                model = _attach_finetuned(model, recipe, device, method, adapter_dir, full_dir)
            t0 = time.time()
            entry: dict[str, Any] = {"model": str(base_path) if name == "base" else str(adapter_dir or full_dir)}
            if want_loss and tok_split.exists():
                loss = dataset_loss(model, _load_tokenized(tok_split, cfg.max_examples), device)
                entry.update(loss=loss["loss"], perplexity=loss["perplexity"], loss_tokens=loss["tokens"])
                per_example_loss[name] = loss["per_example"]
                if name == "finetuned" and tok_train.exists():
                    train_loss = dataset_loss(model, _load_tokenized(tok_train, cfg.max_examples), device)
                    entry.update(train_sample_loss=train_loss["loss"], train_sample_perplexity=train_loss["perplexity"])
            if gen_names:
                t1 = time.time()
                raw = generate(model, tokenizer, prompts, device=device, **gen_kwargs)
                answers[name] = [read_answer(o, template, ex.get("tools"), end_tokens)
                                 for o, ex in zip(raw, examples, strict=True)]
                entry["generation_seconds"] = round(time.time() - t1, 2)
            if pref_rows:
                pref_logps[name] = eval_preference.sequence_logps(model, pref_rows["sequences"],
                                                                  pad_id=tokenizer.pad_token_id, device=device)
            entry["seconds"] = round(time.time() - t0, 2)
            variants[name] = entry
            print(f"eval: {name} done in {entry['seconds']:.0f} s")
        del model

        gguf_status = _gguf_column(recipe, exported, examples, answers, variants, gen_names, cfg,
                                   template=template, end_tokens=end_tokens)

        per_example_scores: dict[str, list[dict[str, float]]] = {}
        sources: dict[str, str] = {}
        for name, outs in answers.items():
            corpus, per_example, sources = metric_lib.score_generations(gen_names, [o["text"] for o in outs], references)
            if "tool_call_match" in gen_names:
                calls_corpus, calls_per_example = metric_lib.score_tool_calls([o["tool_calls"] for o in outs],
                                                                               reference_calls)
                corpus.update(calls_corpus)
                for row, extra in zip(per_example, calls_per_example, strict=True):
                    row.update(extra)
            variants[name].update(corpus)
            variants[name]["answers_cut_at_max_new_tokens"] = sum(o["finish_reason"] == "length" for o in outs)
            per_example_scores[name] = per_example

        for name, outs in answers.items():
            variants[name].update(eval_preference.answer_shape([o["text"] for o in outs]))
        pref_result = None
        if pref_rows:
            pref_result = eval_preference.score(pref_rows, pref_logps, beta=recipe.train.preference.beta)
            for name, values in pref_result["models"].items():
                variants[name].update(values)

        log_rows = read_train_log(_stage_path(trained, ("log",), recipe.run_dir("train") / "log.jsonl"))
        verdict = make_verdict(variants, per_example_scores, per_example_loss, log_rows, gen_names, gguf_status)
        if pref_result and (pref_verdict := eval_preference.verdict(pref_result)):
            verdict["preference"] = pref_verdict
            if verdict["improved"]["status"] == "unknown":  # no generation metric or loss asked for
                verdict["improved"], verdict["summary"] = pref_verdict, pref_verdict["summary"]

        result = {
            "run": recipe.name, "split": cfg.split, "examples": len(examples),
            "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "greedy": cfg.temperature == 0, "batch_size": cfg.batch_size, "padding": "left",
                           "device": device},
            "models": variants, "metric_sources": sources, "gguf": gguf_status, "verdict": verdict,
            "rules": VERDICT_RULES,
        }
        if pref_result:
            result["preference"] = {k: v for k, v in pref_result.items() if k != "per_pair"}
        example_rows = []
        for i, ex in enumerate(examples):
            example_rows.append({
                "id": ex.get("id", str(i)), "prompt": prompts[i], "messages": ex["messages"][:-1],
                "reference": references[i],
                "answers": {name: outs[i]["text"] for name, outs in answers.items()},
                # what each model wrote, special tokens and reasoning included
                "raw": {name: outs[i].get("raw", outs[i]["text"]) for name, outs in answers.items()},
                "finish_reason": {name: outs[i]["finish_reason"] for name, outs in answers.items()},
                "scores": {name: per_example_scores[name][i] for name in answers},
            })
        out = stage.work  # swapped into runs/<name>/eval/ when the stage succeeds
        runs.atomic_write_json(out / "metrics.json", result)
        runs.atomic_write_text(out / "examples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                               for r in example_rows))
        if pref_result:
            runs.atomic_write_text(out / "preference.jsonl", "".join(json.dumps(r) + "\n"
                                                                     for r in pref_result["per_pair"]))
        eval_report.write_report(out, result, example_rows, log_rows, title=f"{recipe.name}: evaluation",
                                 preference_pairs=pref_result["per_pair"] if pref_result else None)
        final = stage.dir
        stage.outputs.update({
            "metrics": str(final / "metrics.json"), "examples": str(final / "examples.jsonl"),
            "report": str(final / "report.html"), "variants": list(variants),
        })
    return result


def command(argv: list[str]) -> int:
    from finetune.cli import load_recipe, recipe_parser

    parser = recipe_parser("eval", "Score the base and the fine-tuned model (and the exported GGUF) on held-out "
                           "examples; write metrics.json and report.html under runs/<name>/eval/.")
    ns = parser.parse_args(argv)
    recipe = load_recipe(ns)
    result = run(recipe, recipe_path=ns.recipe)
    print(summary_table(result))
    print(f"\n{result['verdict']['summary']}")
    if "preference" in result["verdict"] and result["verdict"]["preference"] is not result["verdict"]["improved"]:
        print(result["verdict"]["preference"]["summary"])
    for key in ("overfitting", "underfitting"):
        print(f"{key}: {result['verdict'][key]['finding']}")
    if result["gguf"]["status"] != "scored":
        print(f"gguf: {result['gguf']['reason']}")
    print(f"\nreport: {recipe.run_dir('eval') / 'report.html'}")
    return 0


def summary_table(result: dict[str, Any]) -> str:
    names = list(result["models"])
    keys = [k for k in _TABLE_KEYS if any(k in result["models"][n] for n in names)]
    width = max(len("metric"), *(len(k) for k in keys)) + 2
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>14}" for n in names)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{_fmt(result['models'][n].get(k)):>14}" for n in names))
    return "\n".join(lines)


_TABLE_KEYS = ["tool_call_match", "exact_match", "accuracy", "precision", "recall", "f1", "rouge1", "rouge2", "rougeL", "rougeLsum",
               "bleu", "chrf", "loss", "perplexity", "train_sample_loss", "answers_cut_at_max_new_tokens",
               "answer_words", "answer_lines", "preference_accuracy", "preference_accuracy_per_token", "logp_margin",
               "reward_accuracy", "reward_margin"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------------------------- inputs
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        raise UserError(f"{path}: missing. Run `finetune prepare RECIPE` again (its output is incomplete).")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_train_log(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if Path(path).exists() else []


def _is_chat_example(row: dict[str, Any]) -> bool:
    msgs = row.get("messages")
    return bool(msgs) and len(msgs) >= 2 and msgs[-1].get("role") == "assistant"


def _stage_path(manifest: dict[str, Any], keys: tuple[str, ...], default: Path) -> Path:
    node: Any = manifest.get("outputs", {})
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return Path(node) if node else default


def render_prompt(tokenizer, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                  reasoning: str = "auto") -> str:
    """The prompt text exactly as the chat template renders it in training and serving (the tools, the reasoning
    setting's template switch), ending with the assistant's turn opener."""
    from finetune.data.render import prompt_text

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; eval renders prompts with it (as training does)")
    return prompt_text(tokenizer, messages, tools=tools, reasoning=reasoning)


def read_answer(output: dict[str, Any], template: str, tools: list[dict[str, Any]] | None = None,
                end_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """A generated reply (special tokens kept) read back as the chat template wrote it: ``text`` is what the text
    metrics compare (the answer without reasoning, then the calls), ``tool_calls`` what tool_call_match compares."""
    from finetune.data.toolcalls import parse_reply

    reply = parse_reply(output["text"], template, tools=tools, end_tokens=end_tokens)
    return {"text": metric_lib.answer_text(reply.content, reply.tool_calls), "raw": output["text"],
            "reasoning": reply.reasoning, "tool_calls": reply.tool_calls, "unparsed_call": reply.unparsed,
            "finish_reason": output["finish_reason"], "tokens": output.get("tokens")}


def _resolve_base(recipe):
    from finetune import models

    return models.resolve(recipe.model.id, recipe.model.revision, base_dir=recipe.base_dir,
                          trust_remote_code=recipe.model.trust_remote_code, gated=recipe.model.gated)


def _load_tokenizer(path: Path, trust_remote_code: bool, chat_template: Path | None = None):
    from transformers import AutoTokenizer

    from finetune import models

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:  # model.chat_template, as prepare and train used it
        tok.chat_template = models.read_chat_template(chat_template)
    return tok


def _load_causal_lm(path: Path, recipe, device: str, method: str):
    from finetune import models

    quantization = None
    if method == "qlora" and device == "cuda":
        # The adapter was trained on a 4-bit base: evaluate it on the same 4-bit base.
        import torch
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=models.torch_dtype(recipe.model.dtype, device)
                                          if recipe.model.dtype != "auto" else torch.bfloat16)
    resolved = models.ResolvedModel(Path(path), str(path), "local", None)
    model = models.load_model(resolved, recipe.model.dtype, device=device,
                              trust_remote_code=recipe.model.trust_remote_code,
                              attn_implementation=recipe.model.attn_implementation, quantization_config=quantization)
    model.eval()
    return model


def _attach_finetuned(base_model, recipe, device: str, method: str, adapter_dir: Path | None, full_dir: Path | None):
    if adapter_dir is not None:
        from peft import PeftModel

        if not adapter_dir.exists():
            raise UserError(f"{adapter_dir}: the adapter train recorded is missing. Run `finetune train RECIPE` again.")
        model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    elif full_dir is not None:
        if not full_dir.exists():
            raise UserError(f"{full_dir}: the model train recorded is missing. Run `finetune train RECIPE` again.")
        del base_model
        model = _load_causal_lm(full_dir, recipe, device, method)
    else:
        raise UserError("the train manifest names neither an adapter nor a model. Run `finetune train RECIPE` again.")
    model.eval()
    return model


def _load_tokenized(path: Path, limit: int | None):
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if "desirable" in ds.column_names:  # rated rows (KTO's shape): the loss is on the desirable replies only
        ds = ds.filter(lambda row: bool(row["desirable"]))
    return ds.select(range(min(len(ds), limit))) if limit else ds


# ------------------------------------------------------------------------------------------ computing
def dataset_loss(model, dataset, device: str) -> dict[str, Any]:
    """Mean next-token loss over the labelled tokens (labels != -100), as in training; per-example means too."""
    import torch
    import torch.nn.functional as F

    rows = [(list(r["input_ids"]), list(r["labels"])) for r in dataset]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    nll = [0.0] * len(rows)
    count = [0] * len(rows)
    batch: list[int] = []

    def flush(idx: list[int]) -> None:
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(rows[i][0])
            ids[j, :n] = torch.tensor(rows[i][0])
            labels[j, :n] = torch.tensor(rows[i][1])
            mask[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        valid = shift_labels != -100
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


def generate(model, tokenizer, prompts: list[str], *, device: str, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int) -> list[dict[str, Any]]:
    """Batched generation with left padding; greedy when temperature is 0. One {"text", "finish_reason"} each;
    the text keeps special tokens (reasoning and tool-call markers: read_answer takes it apart)."""
    import torch

    torch.manual_seed(seed)
    stop_ids = _stop_ids(model, tokenizer)
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


def _stop_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    harmony = "<|channel|>" in (getattr(tokenizer, "chat_template", None) or "")
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if token == "<|end|>" and harmony:  # gpt-oss: <|end|> closes the analysis message, not the reply
            continue
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int) and tid not in ids:
            ids.append(tid)
    if not ids:
        raise UserError("the tokenizer has no end-of-sequence token: generation could not stop")
    return ids


def _gguf_column(recipe, exported, examples, answers, variants, gen_names, cfg, *, template: str | None = None,
                 end_tokens: tuple[str, ...] = ()) -> dict[str, Any]:
    """Let the exported GGUF answer the same prompts, rendered and read back as the server does (the rows' tools,
    data.reasoning, special tokens kept); return its status (scored, or why not). ``template``: the chat template
    the transformers column's answers were read with (default: the GGUF's own)."""
    quant = cfg.gguf_quant
    if not cfg.gguf:
        return {"status": "off", "reason": "eval.gguf is false"}
    if exported is None:
        return {"status": "absent", "reason": "export has not run: run `finetune export RECIPE`, then eval again, to "
                "score the GGUF"}
    paths = exported.get("outputs", {}).get("gguf") or {}
    if quant not in paths:
        return {"status": "absent", "reason": f"the export has no {quant} GGUF (it has: {', '.join(paths) or 'none'}); "
                "set eval.gguf_quant to one of those"}
    if not gen_names:
        return {"status": "absent", "reason": "no generation metric asked for (GGUF answers are only scored by those)"}
    path = Path(paths[quant])
    if not path.exists():
        return {"status": "absent", "reason": f"{path} is missing; run `finetune export RECIPE` again"}
    name = f"gguf-{quant}"
    longest = max((len(json.dumps(e, ensure_ascii=False)) for e in examples), default=0)  # characters >= tokens
    n_ctx = max(recipe.serve.n_ctx, cfg.max_new_tokens + longest + 256)
    t0 = time.time()
    try:
        outs, gguf_template = gguf_generate(path, examples, reasoning=recipe.data.reasoning,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            n_ctx=n_ctx, seed=recipe.seed)
    except Exception as exc:  # a crash of the native library arrives here as an error from the child process
        return {"status": "failed", "reason": f"the GGUF could not answer: {type(exc).__name__}: {exc}", "path": str(path)}
    answers[name] = [read_answer(o, template if template is not None else gguf_template, e.get("tools"), end_tokens)
                     for o, e in zip(outs, examples, strict=True)]
    variants[name] = {"model": str(path), "seconds": round(time.time() - t0, 2), "runtime": "llama.cpp"}
    return {"status": "scored", "variant": name, "path": str(path), "quant": quant}


def gguf_generate(path: Path, examples: list[dict[str, Any]], *, reasoning: str, max_new_tokens: int,
                  temperature: float, n_ctx: int, seed: int, stall_s: float = 600.0) -> tuple[list[dict[str, Any]], str]:
    """The GGUF's raw replies (special tokens kept) to each example's conversation without its last turn, from the
    server's own worker in a child process (a native crash fails this column, not eval): the same rendering of
    tools and reasoning as `finetune serve`. Returns (replies, the GGUF's chat template)."""
    from finetune.gguf.worker import Worker

    worker = Worker({"gguf": str(path), "n_ctx": n_ctx, "chat_template": None, "reasoning": reasoning,
                     "threads": max(1, min(os.cpu_count() or 1, 16))})
    info = worker.start()
    outs: list[dict[str, Any]] = []
    try:
        for i, ex in enumerate(examples):
            worker.send({"op": "generate", "id": str(i), "mode": "chat", "messages": ex["messages"][:-1],
                         "tools": ex.get("tools"), "max_tokens": max_new_tokens, "temperature": temperature,
                         "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": seed})
            while True:
                if not worker.conn.poll(stall_s):
                    raise TimeoutError(f"no reply from the llama.cpp worker in {stall_s:.0f} s (example {i})")
                kind, _, payload = worker.recv()
                if kind == "error":
                    raise RuntimeError(f"example {i}: {payload['message']}")
                if kind == "done":
                    reason = "length" if payload["finish_reason"] == "length" else "stop"
                    outs.append({"text": payload["text"].strip(), "finish_reason": reason,
                                 "tokens": payload["completion_tokens"]})
                    break
    finally:
        worker.stop()
    return outs, info.get("template") or ""


# -------------------------------------------------------------------------------------------- verdict
def make_verdict(variants: dict[str, dict[str, Any]], scores: dict[str, list[dict[str, float]]],
                 example_loss: dict[str, list[float]], log_rows: list[dict[str, Any]], gen_names: list[str],
                 gguf_status: dict[str, Any]) -> dict[str, Any]:
    verdict: dict[str, Any] = {}
    primary = next(((m, k) for m, k in PRIMARY_ORDER if m in gen_names), None)
    if primary and "base" in scores and "finetuned" in scores:
        metric, key = primary
        a = [s[key] for s in scores["base"]]
        b = [s[key] for s in scores["finetuned"]]
        boot = metric_lib.paired_bootstrap(a, b)
        verdict["improved"] = _improvement(key, boot, higher_is_better=True, base=sum(a) / len(a),
                                           finetuned=sum(b) / len(b))
        if key in ("exact_match", "tool_call_match"):
            n = len(a)
            verdict["improved"]["wilson95"] = {
                "base": metric_lib.wilson_interval(round(sum(a)), n),
                "finetuned": metric_lib.wilson_interval(round(sum(b)), n),
            }
    if "base" in example_loss and "finetuned" in example_loss:
        pairs = [(x, y) for x, y in zip(example_loss["base"], example_loss["finetuned"], strict=True)
                 if not (math.isnan(x) or math.isnan(y))]
        if pairs:
            boot = metric_lib.paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])
            verdict["loss"] = _improvement("loss", boot, higher_is_better=False,
                                           base=variants["base"]["loss"], finetuned=variants["finetuned"]["loss"])
            verdict.setdefault("improved", verdict["loss"])
    if "improved" not in verdict:
        verdict["improved"] = {"status": "unknown", "metric": None, "summary": "nothing to compare: ask for a "
                               "generation metric or loss in eval.metrics"}
    verdict["summary"] = verdict["improved"]["summary"]
    verdict["overfitting"] = overfitting(log_rows, variants.get("finetuned", {}))
    verdict["underfitting"] = underfitting(log_rows)
    gguf_name = gguf_status.get("variant")
    if gguf_name and gguf_name in scores and primary:
        key = primary[1]
        g = [s[key] for s in scores[gguf_name]]
        f = [s[key] for s in scores["finetuned"]]
        boot = metric_lib.paired_bootstrap(f, g)
        verdict["gguf"] = {
            "metric": key, "finetuned": sum(f) / len(f), "gguf": sum(g) / len(g), "difference": boot["difference"],
            "ci95": [boot["low"], boot["high"]],
            "summary": f"{gguf_name} vs fine-tuned (transformers) on {key}: {sum(g) / len(g):.3f} vs "
                       f"{sum(f) / len(f):.3f} (difference {boot['difference']:+.3f}, 95% CI {boot['low']:+.3f} to "
                       f"{boot['high']:+.3f}).",
        }
    return verdict


def _improvement(metric: str, boot: dict[str, float], *, higher_is_better: bool, base: float,
                 finetuned: float) -> dict[str, Any]:
    low, high = boot["low"], boot["high"]
    better_low, better_high = (low, high) if higher_is_better else (-high, -low)
    status = "improved" if better_low > 0 else "worse" if better_high < 0 else "no clear difference"
    words = {"improved": "Fine-tuning improved", "worse": "Fine-tuning made it worse:",
             "no clear difference": "No clear difference in"}[status]
    label = {"tool_call_match": "function-call exact match", "exact_match": "exact match", "correct": "accuracy", "rougeL": "ROUGE-L", "chrf": "chrF (sentence)",
             "bleu": "BLEU (sentence)", "loss": "held-out loss"}.get(metric, metric)
    summary = (f"{words} {label}: base {base:.3f} → fine-tuned {finetuned:.3f} (difference {boot['difference']:+.3f}, "
               f"95% CI {low:+.3f} to {high:+.3f}, n={boot['n']} paired examples).")
    return {"status": status, "metric": metric, "base": base, "finetuned": finetuned, "difference": boot["difference"],
            "ci95": [low, high], "n": boot["n"], "higher_is_better": higher_is_better, "summary": summary}


def overfitting(log_rows: list[dict[str, Any]], finetuned: dict[str, Any]) -> dict[str, Any]:
    train = [(r["step"], r["loss"]) for r in log_rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in log_rows if r.get("val_loss") is not None]
    evidence = []
    flag = False
    if len(val) >= 3:
        best_step, best = min(val, key=lambda p: p[1])
        last_step, last = val[-1]
        before = [loss for s, loss in train if s <= best_step][-3:]
        after = [loss for s, loss in train if s > best_step][-3:]
        train_fell = bool(before and after) and sum(after) / len(after) < sum(before) / len(before)
        if last > best * 1.05 and last_step > best_step:
            flag = flag or train_fell
            evidence.append(f"validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step})"
                            + (" while training loss kept falling" if train_fell else ""))
        else:
            evidence.append(f"validation loss at the end {last:.3f} is within 5% of its best {best:.3f}")
    else:
        evidence.append(f"only {len(val)} validation point(s) in the train log: too few to see a trend")
    test_loss, train_loss = finetuned.get("loss"), finetuned.get("train_sample_loss")
    if test_loss is not None and train_loss is not None:
        gap = test_loss - train_loss
        big = test_loss > 1.25 * train_loss and gap > 0.1
        flag = flag or big
        evidence.append(f"held-out loss {test_loss:.3f} vs loss on training examples {train_loss:.3f} "
                        f"(gap {gap:+.3f}{', large' if big else ''})")
    finding = ("yes: " if flag else "no: ") + "; ".join(evidence)
    return {"flag": flag, "finding": finding, "rule": VERDICT_RULES["overfitting"]}


def underfitting(log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r["loss"] for r in log_rows if r.get("loss") is not None]
    val = [r["val_loss"] for r in log_rows if r.get("val_loss") is not None]
    if len(train) < 4:
        return {"flag": False, "finding": f"unknown: only {len(train)} training loss point(s) in the train log",
                "rule": VERDICT_RULES["underfitting"]}
    evidence = []
    still_high = train[-1] > 0.7 * train[0]
    evidence.append(f"training loss {train[0]:.3f} → {train[-1]:.3f} ({train[-1] / train[0]:.0%} of the first value)")
    tail = train[-max(4, len(train) // 3):]
    half = len(tail) // 2
    first, second = sum(tail[:half]) / half, sum(tail[half:]) / (len(tail) - half)
    # a loss near 0 that still halves (a preference loss saturating) is not underfitting: ask for a real drop too
    train_falling = second < first * 0.95 and first - second > SATURATED_DROP
    val_falling = len(val) >= 2 and val[-1] == min(val) and val[-1] < val[-2]
    if train_falling:
        evidence.append(f"still falling at the end ({first:.3f} → {second:.3f} over the last third)")
    if val_falling:
        evidence.append(f"validation loss still improving at the end ({val[-2]:.3f} → {val[-1]:.3f})")
    elif train_falling:
        evidence.append("but validation loss is not seen still improving" + (" (fewer than 2 validation points)"
                                                                             if len(val) < 2 else ""))
    flag = still_high or (train_falling and val_falling)
    hint = " More steps (train.epochs / max_steps) or a higher learning rate would likely help." if flag else ""
    return {"flag": flag, "finding": ("yes: " if flag else "no: ") + "; ".join(evidence) + "." + hint,
            "rule": VERDICT_RULES["underfitting"]}
