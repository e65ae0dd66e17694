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

A GRPO run (train.objective grpo) is also scored by the rewards it was trained on (finetune.eval_reward): every
variant answers, whether or not a generation metric is asked for, and its split's prompt-only rows are scored too:
their prompt is the whole conversation, they have no reference (exact match and the other reference metrics count
only the rows that have one: ``examples_with_reference`` in metrics.json), and their ``extra_columns`` reach the
reward functions as keyword arguments, as in training.

Writes runs/<name>/eval/: metrics.json (one entry per model variant and a verdict), examples.jsonl (every
prompt with its reference, each model's answer and scores), report.html (self-contained: plots embedded),
loss_curves.png (a GRPO run: reward_curves.png), metrics.png and manifest.json.

The verdict states its rules (finetune.verdict.rules): improvement needs a paired-bootstrap 95% interval of the
difference that excludes zero; over- and underfitting are read from train's log.jsonl and from the gap between the
fine-tuned model's loss on training examples and on held-out examples (a GRPO run's from its rewards instead).
Loading the models, the loss and generation live in finetune.eval_models; the command line in finetune.commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from finetune import eval_forgetting, eval_models, eval_preference, eval_reward, hardware, models, verdict
from finetune import metrics as metric_lib
from finetune.console import duration
from finetune.errors import UserError
from finetune.run import artifacts, runs
from finetune.training import model_setup

GENERATION_METRICS = ("exact_match", "accuracy", "precision", "recall", "f1", "rouge", "bleu", "chrf",
                      "tool_call_match")


# ------------------------------------------------------------------------------------------------ stage
def run(recipe, upstream: artifacts.Upstream | None = None, *, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """Score base, fine-tuned and (if exported) GGUF models; write metrics.json, examples.jsonl, report.html.
    ``upstream``: the prepared data, trained model and export to score (default: this recipe's, fresh)."""
    cfg = recipe.eval
    upstream = upstream if upstream is not None else artifacts.for_stage(recipe, "eval", recipe_path)
    prepared, trained, exported = upstream.prepared, upstream.trained, upstream.exported

    split_file = prepared.splits[cfg.split]
    by_reward = recipe.train.objective == "grpo"  # scored by its rewards too, prompt-only rows included
    examples, gen_names = _examples(split_file, cfg, recipe_path, by_reward=by_reward)
    want_loss = any(m in cfg.metrics for m in ("loss", "perplexity"))
    tok_split, tok_train = prepared.tokenized[cfg.split], prepared.tokenized["train"]
    pref_rows = eval_preference.read_rows(tok_split, cfg.max_examples)  # None unless the split holds preferences

    device = hardware.device()
    method, adapter_dir, full_dir, base_path = trained.method, trained.adapter, trained.model, trained.base_model
    tokenizer, prompts = _prompts(recipe, adapter_dir or full_dir or base_path, examples)
    references, reference_calls = _references(examples)
    template = tokenizer.chat_template or ""
    end_tokens = tuple(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.batch_size,
                      seed=recipe.seed)
    load = eval_models.LoadOptions(device, recipe.model.dtype, recipe.model.trust_remote_code,
                                   recipe.model.attn_implementation, four_bit=method == "qlora")

    runs.make_dir(recipe.run_dir())
    with runs.StageRun(recipe, "eval", inputs={
        "prepare": prepared.manifest_id, "train": trained.manifest_id,
        "export": exported.manifest_id if exported else None, "split": str(split_file),
    }, upstream=upstream.ids(), aside=True) as stage:
        print(f"eval: {len(examples)} {cfg.split} examples, {device}, base model {base_path}")
        forgetting = eval_forgetting.ForgettingCheck(
            tokenizer, base_dir=base_path, device=device, reasoning=recipe.data.reasoning,
            cache_from=recipe.run_dir("eval"), cache_to=stage.work, batch_size=cfg.batch_size, seed=recipe.seed,
        ) if cfg.forgetting and template else None
        columns = _transformers_columns(
            load, base_path, adapter_dir, full_dir, tokenizer, prompts, examples, device=device,
            loss_splits=(tok_split, tok_train) if want_loss else None, max_examples=cfg.max_examples,
            generate=gen_kwargs if gen_names or by_reward else None, template=template, end_tokens=end_tokens,
            pref_sequences=pref_rows["sequences"] if pref_rows else None, forgetting=forgetting)
        variants, answers, per_example_loss, pref_logps = columns

        gguf_status = _gguf_column(recipe, exported, examples, answers, variants, gen_names, cfg,
                                   template=template, end_tokens=end_tokens, by_reward=by_reward)

        per_example_scores, sources = _score_answers(answers, references, reference_calls, gen_names, variants,
                                                     hub_metrics=cfg.hub_metrics)
        if by_reward and answers:  # the rewards it was trained on (finetune/eval_reward.py)
            eval_reward.score(recipe.train.rewards, recipe.base_dir, answers, prompts, references, variants,
                              per_example_scores, template=template,
                              columns=[ex.get("extra_columns") or {} for ex in examples])
        pref_result = None
        if pref_rows:
            pref_result = eval_preference.score(pref_rows, pref_logps, beta=recipe.train.preference.beta)
            for name, values in pref_result["models"].items():
                variants[name].update(values)

        log_rows = read_train_log(trained.log)
        found = _verdict(variants, per_example_scores, per_example_loss, log_rows, gen_names, gguf_status, pref_result)
        forgot = forgetting.result() if forgetting else None
        if forgot:
            found["forgetting"] = verdict.forgetting(forgot)
            print(f"eval: {found['forgetting']['summary']} ({duration(forgot['seconds'])})")

        result = {
            "run": recipe.name, "split": cfg.split, "examples": len(examples),
            "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "greedy": cfg.temperature == 0, "batch_size": cfg.batch_size, "padding": "left",
                           "device": device},
            "models": variants, "metric_sources": sources, "gguf": gguf_status, "verdict": found,
            "rules": verdict.rules(by_reward), **({"forgetting": forgot} if forgot else {}),
        }
        if by_reward:  # the rows exact match and the other reference metrics were scored on
            result["examples_with_reference"] = sum(r is not None for r in references)
        if pref_result:
            result["preference"] = {k: v for k, v in pref_result.items() if k != "per_pair"}
        example_rows = _example_rows(examples, prompts, references, answers, per_example_scores)
        _write_outputs(stage.work, result, example_rows, log_rows, pref_result, title=f"{recipe.name}: evaluation",
                       exported=exported)
        stage.record(artifacts.Evaluated(metrics=stage.dir / "metrics.json", examples=stage.dir / "examples.jsonl",
                                         report=stage.dir / "report.html", variants=list(variants)))
    return result


def _prompts(recipe, tokenizer_dir: Path, examples: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """The tokenizer the answers are rendered and read with (model.chat_template as prepare and train used it) and
    each example's prompt, rendered as training rendered it."""
    from finetune.data.render import prompt_text

    tokenizer = models.load_tokenizer(tokenizer_dir, trust_remote_code=recipe.model.trust_remote_code,
                                      chat_template=recipe.chat_template_path())
    if examples and not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; eval renders prompts with it (as training does)")
    return tokenizer, [prompt_text(tokenizer, eval_reward.prompt_messages(ex), tools=ex.get("tools"),
                                   reasoning=recipe.data.reasoning) for ex in examples]


def _references(examples: list[dict[str, Any]]) -> tuple[list[str | None], list[list[dict[str, Any]]]]:
    """Each example's reference answer as the metrics compare it (text, then calls) and its tool calls; None (and
    no calls) for a prompt-only row."""
    replies = [ex["messages"][-1] if eval_reward.has_reference(ex) else None for ex in examples]
    calls = [metric_lib.canonical_calls(m.get("tool_calls")) if m else [] for m in replies]
    texts = [metric_lib.answer_text(m["content"], c) if m else None for m, c in zip(replies, calls, strict=True)]
    return texts, calls


def _verdict(variants, per_example_scores, per_example_loss, log_rows, gen_names, gguf_status,
             pref_result: dict[str, Any] | None) -> dict[str, Any]:
    """Did fine-tuning help (``verdict.make_verdict``), with the preference verdict on preference data (the headline
    when no generation metric or loss was asked for)."""
    found = verdict.make_verdict(variants, per_example_scores, per_example_loss, log_rows, gen_names, gguf_status)
    if pref_result and (pref_verdict := eval_preference.verdict(pref_result)):
        found["preference"] = pref_verdict
        if found["improved"]["status"] == "unknown":
            found["improved"], found["summary"] = pref_verdict, pref_verdict["summary"]
    return found


def _examples(split_file: Path, cfg: Any, recipe_path: str, *,
              by_reward: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat examples of the split eval scores (at most eval.max_examples; for a GRPO run, ``by_reward``, its
    prompt-only rows too) and the generation metrics asked for; refuses an empty split (NothingToDo), and a split
    with nothing to answer: generation metrics without chat rows, a GRPO run without prompts."""
    rows = read_jsonl(split_file)
    if not rows:
        other = "validation" if cfg.split == "test" else "test"
        raise runs.NothingToDo(f"the {cfg.split} split is empty ({split_file} has no rows). To get one: set "
                               f"data.split.{cfg.split} (e.g. 0.1) or add a source with role: {cfg.split}, then run "
                               f"`finetune prepare {recipe_path}`; or score the other split: eval.split={other}.")
    gen_names = [m for m in cfg.metrics if m in GENERATION_METRICS]
    if by_reward:
        examples = eval_reward.examples(rows, cfg.max_examples)
        if not examples:
            raise UserError(f"{split_file}: no prompt to score ({len(rows)} rows): a GRPO run's eval answers "
                            "conversations ending in a reply and prompt-only rows, and scores them with train.rewards.")
        return examples, gen_names
    # rated rows (KTO's shape): only a desirable reply is a reference answer
    examples = [r for r in rows if _is_chat_example(r) and r.get("desirable") is not False][: cfg.max_examples]
    if gen_names and not examples:
        raise UserError(
            f"{split_file}: no conversation ending in an assistant turn to score ({len(rows)} rows). Generation "
            f"metrics ({', '.join(gen_names)}) need chat rows; for raw text use eval.metrics: [loss, perplexity]."
        )
    return examples, gen_names


def _transformers_columns(load: Any, base_path: Path, adapter_dir: Path | None, full_dir: Path | None, tokenizer: Any,
                          prompts: list[str], examples: list[dict[str, Any]], *, device: str,
                          loss_splits: tuple[Path, Path] | None, max_examples: int | None,
                          generate: dict[str, Any] | None, template: str, end_tokens: tuple[str, ...],
                          pref_sequences: list[Any] | None,
                          forgetting: eval_forgetting.ForgettingCheck | None = None) -> tuple[dict, dict, dict, dict]:
    """The base model, then the fine-tuned one (the adapter attached to the same loaded base): held-out loss (and the
    fine-tuned model's loss on a training sample), answers to the prompts, preference log-probabilities, and what
    the forgetting check measures of each.
    Returns (variants, answers, per-example loss, preference log-probabilities), each by model name."""
    variants: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    per_example_loss: dict[str, list[float]] = {}
    pref_logps: dict[str, list[tuple[float, int]]] = {}
    model = eval_models.load_causal_lm(base_path, load)
    model_setup.grow_embeddings(model, len(tokenizer))  # turn tokens a built-in model.chat_template added
    for name in ("base", "finetuned"):
        if name == "finetuned":
            model = eval_models.attach_finetuned(model, load, adapter_dir, full_dir)
        t0 = time.time()
        entry: dict[str, Any] = {"model": str(base_path) if name == "base" else str(adapter_dir or full_dir)}
        if loss_splits is not None and loss_splits[0].exists():
            tok_split, tok_train = loss_splits
            loss = eval_models.dataset_loss(model, eval_models.load_tokenized(tok_split, max_examples), device)
            if loss["tokens"]:  # none when every row is prompt-only (a GRPO split): no loss to report
                entry.update(loss=loss["loss"], perplexity=loss["perplexity"], loss_tokens=loss["tokens"])
                per_example_loss[name] = loss["per_example"]
            if name == "finetuned" and tok_train.exists():
                train_loss = eval_models.dataset_loss(model, eval_models.load_tokenized(tok_train, max_examples), device)
                if train_loss["tokens"]:
                    entry.update(train_sample_loss=train_loss["loss"], train_sample_perplexity=train_loss["perplexity"])
        if generate is not None:
            t1 = time.time()
            raw = eval_models.generate(model, tokenizer, prompts, device=device, **generate)
            answers[name] = [eval_models.read_answer(o, template, ex.get("tools"), end_tokens)
                             for o, ex in zip(raw, examples, strict=True)]
            entry["generation_seconds"] = round(time.time() - t1, 2)
        if pref_sequences:
            pref_logps[name] = eval_preference.sequence_logps(model, pref_sequences, pad_id=tokenizer.pad_token_id,
                                                              device=device)
        if forgetting is not None:
            forgetting.observe(name, model)
        entry["seconds"] = round(time.time() - t0, 2)
        variants[name] = entry
        print(f"eval: {name} done in {duration(entry['seconds'])}")
    del model
    return variants, answers, per_example_loss, pref_logps


def _write_outputs(out: Path, result: dict[str, Any], example_rows: list[dict[str, Any]],
                   log_rows: list[dict[str, Any]], pref_result: dict[str, Any] | None, *, title: str,
                   exported: artifacts.Exported | None = None) -> None:
    """metrics.json, examples.jsonl, preference.jsonl (preference data), report.html and its charts (with export's
    quantization table when there is one), into ``out`` (the stage's work folder, swapped into runs/<name>/eval/
    when the stage succeeds)."""
    from finetune import eval_report

    runs.atomic_write_json(out / "metrics.json", result)
    runs.atomic_write_text(out / "examples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in example_rows))
    if pref_result:
        runs.atomic_write_text(out / "preference.jsonl", "".join(json.dumps(r) + "\n" for r in pref_result["per_pair"]))
    table = exported.quantization if exported else None
    chart = exported.quantization_chart if exported else None
    eval_report.write_report(out, result, example_rows, log_rows, title=title,
                             preference_pairs=pref_result["per_pair"] if pref_result else None,
                             quantization=json.loads(table.read_text()) if table and table.is_file() else None,
                             quantization_png=chart.read_bytes() if chart and chart.is_file() else None)


def _score_answers(answers: dict[str, list[dict[str, Any]]], references: list[str | None],
                   reference_calls: list[list[dict[str, Any]]], gen_names: list[str],
                   variants: dict[str, dict[str, Any]], *, hub_metrics: bool
                   ) -> tuple[dict[str, list[dict[str, float]]], dict[str, str]]:
    """Score every variant's answers against the references: corpus scores, cut answers and answer shape go into
    ``variants``; returns the per-example scores per variant and the metric sources (``hub_metrics``: the Hub's
    metric modules when they can be loaded, see finetune.metrics.load). A row without a reference (None: a
    prompt-only row) gets no reference metric, and the corpus scores count only the rows that have one."""
    per_example_scores: dict[str, list[dict[str, float]]] = {}
    sources: dict[str, str] = {}
    scored = [k for k, r in enumerate(references) if r is not None]  # prompt-only rows have no reference to match
    for name, outs in answers.items():
        per_example: list[dict[str, float]] = [{} for _ in outs]
        corpus, some, sources = metric_lib.score_generations(gen_names, [outs[k]["text"] for k in scored],
                                                              [references[k] for k in scored], prefer_hub=hub_metrics)
        if "tool_call_match" in gen_names:
            calls_corpus, calls_per_example = metric_lib.score_tool_calls([outs[k]["tool_calls"] for k in scored],
                                                                           [reference_calls[k] for k in scored])
            corpus.update(calls_corpus)
            for row, extra in zip(some, calls_per_example, strict=True):
                row.update(extra)
        for k, row in zip(scored, some, strict=True):
            per_example[k] = row
        variants[name].update(corpus)
        variants[name]["answers_cut_at_max_new_tokens"] = sum(o["finish_reason"] == "length" for o in outs)
        per_example_scores[name] = per_example

    for name, outs in answers.items():
        variants[name].update(eval_preference.answer_shape([o["text"] for o in outs]))
    return per_example_scores, sources


def _example_rows(examples: list[dict[str, Any]], prompts: list[str], references: list[str | None],
                  answers: dict[str, list[dict[str, Any]]],
                  per_example_scores: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """examples.jsonl: every prompt with its reference (None for a prompt-only row), each model's answer and
    scores."""
    rows = []
    for i, ex in enumerate(examples):
        rows.append({
            "id": ex.get("id", str(i)), "prompt": prompts[i], "messages": eval_reward.prompt_messages(ex),
            "reference": references[i],
            "answers": {name: outs[i]["text"] for name, outs in answers.items()},
            # what each model wrote, special tokens and reasoning included
            "raw": {name: outs[i].get("raw", outs[i]["text"]) for name, outs in answers.items()},
            "finish_reason": {name: outs[i]["finish_reason"] for name, outs in answers.items()},
            "scores": {name: per_example_scores[name][i] for name in answers},
        })
    return rows


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


def _gguf_column(recipe, exported, examples, answers, variants, gen_names, cfg, *, template: str | None = None,
                 end_tokens: tuple[str, ...] = (), by_reward: bool = False) -> dict[str, Any]:
    """Let the exported GGUF answer the same prompts, rendered and read back as the server does (the rows' tools,
    data.reasoning, special tokens kept); return its status (scored, or why not). ``template``: the chat template
    the transformers column's answers were read with (default: the GGUF's own); ``by_reward``: its answers are
    scored by a GRPO run's rewards, so it answers without a generation metric too."""
    if not cfg.gguf:
        return {"status": "off", "reason": "eval.gguf is false"}
    if exported is None:
        return {"status": "absent", "reason": "export has not run: run `finetune export RECIPE`, then eval again, to "
                "score the GGUF"}
    paths = exported.gguf
    # the file served and in the Modelfile, unless eval.gguf_quant names another
    asked = artifacts.requested(cfg, "gguf_quant") or artifacts.requested(recipe.serve, "quant")
    try:
        quant = exported.gguf_to_serve(asked)
    except UserError as exc:
        return {"status": "absent", "reason": f"{exc}; set eval.gguf_quant to one of those"}
    if not gen_names and not by_reward:
        return {"status": "absent", "reason": "no generation metric asked for (GGUF answers are only scored by those)"}
    path = Path(paths[quant])
    if not path.exists():
        return {"status": "absent", "reason": f"{path} is missing; run `finetune export RECIPE` again"}
    name = f"gguf-{quant}"
    longest = max((len(json.dumps(e, ensure_ascii=False)) for e in examples), default=0)  # characters >= tokens
    n_ctx = max(recipe.serve.n_ctx, cfg.max_new_tokens + longest + 256)
    processes = eval_models.gguf_processes(path, len(examples))
    t0 = time.time()
    try:
        outs, gguf_template = eval_models.gguf_generate(path, examples, reasoning=recipe.data.reasoning,
                                                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                        n_ctx=n_ctx, seed=recipe.seed, processes=processes)
    except Exception as exc:  # a crash of the native library arrives here as an error from the child process
        return {"status": "failed", "reason": f"the GGUF could not answer: {type(exc).__name__}: {exc}", "path": str(path)}
    answers[name] = [eval_models.read_answer(o, template if template is not None else gguf_template, e.get("tools"),
                                             end_tokens)
                     for o, e in zip(outs, examples, strict=True)]
    variants[name] = {"model": str(path), "seconds": round(time.time() - t0, 2), "runtime": "llama.cpp",
                      "processes": processes}
    print(f"eval: {name} done in {duration(variants[name]['seconds'])} ({len(examples)} prompts, {processes} llama.cpp "
          f"process{'es' if processes > 1 else ''})")
    return {"status": "scored", "variant": name, "path": str(path), "quant": quant}
