"""export: the trained model as a merged Hugging Face checkpoint and verified GGUF files, from pip alone.

    finetune export RECIPE

1. Merge the LoRA/DoRA adapter into the base weights (``finetune.merge``: on CPU in float32, saved in the base's
   dtype, with the tokenizer, its chat template, and the end-of-turn token as EOS) into export/merged/.
2. Convert with llama.cpp's own converter (from the installed llama-cpp-python's source) to F16 (or BF16/F32),
   then quantize with llama.cpp's quantizer to each type in export.quantizations.
3. Convert the LoRA adapter alone to a GGUF adapter (for ``Llama(lora_path=...)`` over the base GGUF).
4. Parity checks against the HF model, in child processes, written to parity.json; any failure fails the export.
5. An Ollama Modelfile next to each GGUF, and model cards (``finetune.card``): README.md (what was trained, parity,
   the files, how to run them) and merged/README.md.

Outputs in runs/<name>/export/: merged/, <name>-F16.gguf, <name>-Q8_0.gguf, ..., <name>-adapter-F16.gguf,
<name>-base-F16.gguf, *.Modelfile, Modelfile, README.md, parity.json, manifest.json.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import card, models
from finetune.errors import UserError
from finetune.merge import checkpoint_dtype, load_chat_tokenizer, merge
from finetune.run import artifacts, runs

GREEDY_MAX_TOKENS = 128  # the greedy-chat check: an answer that has not ended by then "did not stop"

# -------------------------------------------------------------------------------------------- export

def export_model(*, name: str, out_dir: Path, base_dir: Path | None, adapter_dir: Path | None = None,
                 model_dir: Path | None = None, outtype: str = "F16", quantizations: list[str] | tuple = ("Q8_0", "Q4_K_M"),
                 adapter_gguf: bool = True, ollama: bool = True, parity_checks: bool = True,
                 min_top1_unquantized: float = 0.99, heldout_rows: list[dict] | None = None,
                 default_quant: str | None = None, calibration: Calibration | None = None,
                 table: TableSettings | None = None, system_prompt: str | None = None,
                 trained_tokens: int | None = None, log=print) -> dict[str, Any]:
    """Merge, convert, quantize, check and describe; returns what was written (paths, sizes, parity summary,
    quantization table).

    ``default_quant``: the type asked for (serve.quant when the recipe sets it; None: ``artifacts.recommended_type``),
    the ``Modelfile``'s. ``system_prompt``: the one the model was trained with (the Modelfile's SYSTEM; None: the
    chat template's default). ``trained_tokens``: the longest training sequence (the Modelfile's num_ctx follows it).
    ``calibration``: text for the importance matrix of the sub-8-bit types (None: quantize without one).
    Raises UserError (after writing parity.json) when a parity check fails.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    table = table or TableSettings()
    quantizations = _check_types(outtype, quantizations, calibration)
    adapter_gguf = adapter_gguf and adapter_dir is not None
    _preflight(name, out_dir, base_dir=base_dir, adapter_dir=adapter_dir, model_dir=model_dir, outtype=outtype,
               quantizations=quantizations, adapter_gguf=adapter_gguf)

    weights = base_dir if adapter_dir else (model_dir or base_dir)
    log("export: merging" + (f" the adapter {adapter_dir} into {base_dir}" if adapter_dir else f" {weights}"))
    merged_dir = out_dir / "merged"
    with _timed(timings, "merge"):
        merged = merge(base_dir=base_dir, adapter_dir=adapter_dir, model_dir=model_dir, out_dir=merged_dir)
    if merged["eos_before"] != merged["end_of_turn"]:
        log(f"export: EOS set to the end-of-turn token {merged['end_of_turn']!r} (was {merged['eos_before']!r})")
    tokenizer = load_chat_tokenizer(merged_dir)  # the exported model's, for calibration and the checks below
    # general.name: the base model's (llama.cpp's tokenizer reads model quirks from it), not "Merged"
    from finetune.gguf import convert

    base_name = convert.model_name(base_dir or model_dir)
    ggufs, guided, imatrix_file, imatrix_info = _convert_and_quantize(
        name, out_dir, merged_dir, tokenizer, outtype=outtype, quantizations=quantizations, base_name=base_name,
        calibration=calibration, timings=timings, log=log)
    adapter_file = base_file = None
    if adapter_gguf:
        with _timed(timings, "adapter"):
            adapter_file, base_file = _adapter_ggufs(name, out_dir, adapter_dir, base_dir, base_name, log)

    report: dict[str, Any] | None = None
    if parity_checks:
        with _timed(timings, "parity"):
            report = _parity(out_dir, merged_dir, tokenizer, ggufs, heldout_rows, n_params=merged["n_params"],
                             min_top1_unquantized=min_top1_unquantized, unquantized=outtype,
                             adapter=(base_file, adapter_file) if adapter_file else None, log=log)
        _write_parity(out_dir, report, timings)

    with _timed(timings, "table"):
        quant, chart = _quantization_table(out_dir, tokenizer, ggufs, report, heldout_rows, table,
                                           guided=set(guided), imatrix_info=imatrix_info, log=log)
    # the rule serve, chat and eval follow (Exported.gguf_to_serve): a type asked for, else the picked, else Q8_0
    default = artifacts.served_type(list(ggufs), quant["picked"], default_quant)
    warnings = _modelfiles(out_dir, ggufs, tokenizer, outtype=outtype, default=default, system_prompt=system_prompt,
                           trained_tokens=trained_tokens, log=log) if ollama else []
    sizes = {q: p.stat().st_size for q, p in ggufs.items()}
    runs.atomic_write_text(out_dir / "README.md", card.export_readme(
        name, ggufs, sizes, adapter_file, base_file, report, ollama, default, merged["vision_kept"])
        + card.quantization_section(quant, chart))
    timings["total"] = time.time() - t0
    return {
        "merged": str(merged_dir), "merge": merged,
        "gguf": {q: str(p) for q, p in ggufs.items()}, "sizes": sizes,
        "adapter_gguf": str(adapter_file) if adapter_file else None,
        "base_gguf": str(base_file) if base_file else None,
        "parity": str(out_dir / "parity.json") if report is not None else None,
        "parity_summary": card.parity_summary(report) if report is not None else None,
        "warnings": warnings, "seconds": {k: round(v, 1) for k, v in timings.items()},
        "quantization": str(out_dir / "quantization.json"), "picked": quant["picked"],
        "quantization_chart": str(chart) if chart else None,
        "imatrix": str(imatrix_file) if imatrix_file else None, "served": default,
    }


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t = time.time()
    yield
    timings[key] = time.time() - t


def _check_types(outtype: str, quantizations: list[str] | tuple, calibration: Calibration | None) -> list[str]:
    """The quantization types to make (the unquantized one left out), each known and makeable."""
    from finetune.gguf import runtime

    types = [q.upper() for q in quantizations if q.upper() != outtype.upper()]
    for q in types:
        if q in runtime.NEEDS_IMATRIX and calibration is None:
            raise UserError(f"export.quantizations: {q} needs an importance matrix; turn export.imatrix on "
                            "(the default) or use Q4_K_M, Q5_K_M, Q6_K or Q8_0 instead")
        if q not in runtime.FTYPES:
            raise UserError(f"export.quantizations: unknown type {q!r}; known: {', '.join(sorted(runtime.FTYPES))}")
    return types


def _preflight(name: str, out_dir: Path, *, base_dir: Path | None, adapter_dir: Path | None,
               model_dir: Path | None, outtype: str, quantizations: list[str], adapter_gguf: bool) -> None:
    """Fail before the slow parts: architecture unknown to the converter, no chat template, too little disk."""
    from finetune.gguf import convert

    weights = base_dir if adapter_dir else (model_dir or base_dir)
    convert.check_architecture(weights)
    if adapter_gguf and not _is_dora(adapter_dir):
        convert.check_adapter_gguf(models.read_config(base_dir))
    load_chat_tokenizer(adapter_dir or model_dir or base_dir)
    weight_bytes = sum(p.stat().st_size for p in Path(weights).glob("*.safetensors"))
    n_est = weight_bytes // (4 if checkpoint_dtype(weights).itemsize == 4 else 2)
    needed = weight_bytes + convert.estimate_bytes(n_est, outtype) + sum(convert.estimate_bytes(n_est, q) for q in quantizations)
    if adapter_gguf:
        needed += convert.estimate_bytes(n_est, "F16")
    convert.check_free_space(out_dir, needed, f"exporting {name}")


def _convert_and_quantize(name: str, out_dir: Path, merged_dir: Path, tokenizer, *, outtype: str,
                          quantizations: list[str], base_name: str | None, calibration: Calibration | None,
                          timings: dict[str, float], log) -> tuple[dict[str, Path], list[str], Path | None, Any]:
    """The unquantized GGUF, the importance matrix (for the sub-8-bit types, when there is calibration text) and
    each quantized GGUF: ({type: path}, the types quantized with the matrix, the matrix file, what it was made of)."""
    from finetune.gguf import convert, imatrix, runtime

    ggufs: dict[str, Path] = {}
    log(f"export: converting to GGUF {outtype} with llama.cpp's converter")
    with _timed(timings, "convert"):
        ggufs[outtype] = convert.convert_model(merged_dir, out_dir / f"{name}-{outtype}.gguf", outtype,
                                               model_name=base_name)
    imatrix_file, imatrix_info = None, None
    guided = [q for q in quantizations if q not in IMATRIX_FREE] if calibration is not None else []
    if guided:
        imatrix_file = out_dir / f"{name}-imatrix.gguf"
        with _timed(timings, "imatrix"):
            imatrix_info = imatrix.from_calibration(tokenizer, merged_dir, ggufs[outtype], imatrix_file, calibration, log)
    with _timed(timings, "quantize"):
        for q in quantizations:
            log(f"export: quantizing to {q}" + (" with the importance matrix" if q in guided else ""))
            ggufs[q] = out_dir / f"{name}-{q}.gguf"
            runtime.quantize(ggufs[outtype], ggufs[q], q, imatrix=imatrix_file if q in guided else None)
    return ggufs, guided, imatrix_file, imatrix_info


def _adapter_ggufs(name: str, out_dir: Path, adapter_dir: Path, base_dir: Path, base_name: str | None,
                   log) -> tuple[Path | None, Path | None]:
    """The LoRA adapter as a GGUF adapter and the base model to load it over (none for DoRA)."""
    from finetune.gguf import convert

    if _is_dora(adapter_dir):
        log("export: DoRA adapters have no llama.cpp GGUF adapter format; use the merged GGUFs")
        return None, None
    if _adapter_config(adapter_dir).get("target_parameters"):
        log("export: LoRA on expert tensors (train.lora.experts) has no llama.cpp GGUF adapter; use the merged GGUFs")
        return None, None
    if _adapter_config(adapter_dir).get("trainable_token_indices"):
        log("export: the adapter trains the rows of turn tokens a built-in model.chat_template added, which the base "
            "GGUF has no rows for: no llama.cpp GGUF adapter; use the merged GGUFs")
        return None, None
    log("export: converting the LoRA adapter to a GGUF adapter (and the base model, to load it over)")
    adapter_file = convert.convert_lora(adapter_dir, base_dir, out_dir / f"{name}-adapter-F16.gguf", "F16")
    base_file = convert.convert_model(base_dir, out_dir / f"{name}-base-F16.gguf", "F16", model_name=base_name)
    return adapter_file, base_file


def _parity(out_dir: Path, merged_dir: Path, tokenizer, ggufs: dict[str, Path], heldout_rows: list[dict] | None, *,
            n_params: int, min_top1_unquantized: float, unquantized: str,
            adapter: tuple[Path, Path] | None, log) -> dict[str, Any]:
    """Export's parity checks of every GGUF against the merged model (``finetune.gguf.parity``), on the held-out
    rows (the test split; built-in texts without one)."""
    from finetune.gguf import parity

    log("export: parity checks (tokens, chat prompt, logits per type, greedy chat)")
    rows = heldout_rows or parity.FALLBACK_HELDOUT
    sequences = parity.heldout_sequences(tokenizer, rows) or parity.heldout_sequences(tokenizer, parity.FALLBACK_HELDOUT)
    conversations = _renderable(tokenizer, _prompt_conversations(rows))
    ref = out_dir / ".reference-logits.npy"
    try:
        hf = parity.HFReference(merged_dir, tokenizer)
        hf.save_logits(sequences, ref)
        report = parity.run_checks(
            model_dir=merged_dir, ggufs=ggufs, tokenizer=tokenizer, sequences=sequences,
            conversations=conversations, greedy_conversations=conversations[:2], reference=ref, hf=hf,
            n_params=n_params, min_top1_unquantized=min_top1_unquantized, unquantized=unquantized,
            adapter=adapter, greedy_max_tokens=GREEDY_MAX_TOKENS,
        )
    finally:
        ref.unlink(missing_ok=True)
    report["heldout"] = {"sequences": len(sequences), "tokens": sum(len(s) for s in sequences),
                         "source": "test split" if heldout_rows else "built-in texts (no prepare test split)"}
    return report


def _write_parity(out_dir: Path, report: dict[str, Any], timings: dict[str, float]) -> None:
    """parity.json (with the seconds each step took so far); a UserError naming every failed check."""
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    runs.atomic_write_json(out_dir / "parity.json", report)
    if not report["ok"]:
        raise UserError(f"export: {len(report['failed'])} parity check(s) failed; the GGUF would not behave like "
                        f"the trained model (details: {out_dir / 'parity.json'}):\n  - " + "\n  - ".join(report["failed"]))


def _quantization_table(out_dir: Path, tokenizer, ggufs: dict[str, Path], report: dict | None,
                        heldout_rows: list[dict] | None, table: TableSettings, *, guided: set[str],
                        imatrix_info: Any, log) -> tuple[dict[str, Any], Path | None]:
    """quantization.json (and its chart): each type's size, agreement, task metric and speed, and the type picked
    for ``table.fit_gb`` (None without a budget)."""
    from finetune.gguf import quant_table

    prompts = quant_table.task_prompts(heldout_rows or [], table.examples)
    answer_tokens = [len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in prompts]
    rows = quant_table.build(ggufs, parity_types=(report or {}).get("types"), prompts=prompts,
                             max_tokens=min(256, max(answer_tokens, default=0) + 16), imatrix_types=guided, log=log)
    fit_bytes = int(table.fit_gb * 1e9) if table.fit_gb is not None else None
    picked, why = quant_table.pick(rows, fit_bytes=fit_bytes, tolerance=table.tolerance)
    quant = {"rows": rows, "picked": picked, "why": why, "fit_gb": table.fit_gb, "tolerance": table.tolerance,
             "imatrix": imatrix_info}
    runs.atomic_write_json(out_dir / "quantization.json", quant)
    chart = quant_table.plot(rows, out_dir / "quantization.png")
    if table.fit_gb is not None:
        log(f"export: picked {picked}: {why}" if picked else f"export: WARNING: {why}")
    return quant, chart


def _modelfiles(out_dir: Path, ggufs: dict[str, Path], tokenizer, *, outtype: str, default: str,
                system_prompt: str | None = None, trained_tokens: int | None = None, log) -> list[str]:
    """An Ollama Modelfile per GGUF (``Modelfile``: the default type's); returns the warnings."""
    from finetune.gguf import ollama as ollama_mod
    from finetune.gguf import parity, runtime

    warnings: list[str] = []
    info = runtime.inspect(ggufs[outtype])
    stop = [tokenizer.convert_ids_to_tokens(i) for i in models.end_of_turn_ids(tokenizer)]
    num_ctx = ollama_mod.context_length(trained_tokens, info["n_ctx_train"])
    trained = system_prompt is not None
    system = system_prompt if trained else parity.default_system_prompt(tokenizer)
    for qtype, path in ggufs.items():
        text, warning = ollama_mod.modelfile(path.name, jinja_template=info["chat_template"], stop_tokens=stop,
                                             num_ctx=num_ctx, default_system=system, trained_system=trained)
        runs.atomic_write_text(out_dir / ollama_mod.modelfile_name(path.name), text)
        if qtype == default:
            runs.atomic_write_text(out_dir / "Modelfile", text.replace(ollama_mod.modelfile_name(path.name), "Modelfile"))
        if warning and warning not in warnings:
            warnings.append(warning)
            log(f"export: WARNING: {warning}")
    return warnings


# Types quantized without an importance matrix: 8 bits and more lose too little for one to matter.
IMATRIX_FREE = {"F32", "F16", "BF16", "Q8_0"}


@dataclass(frozen=True)
class Calibration:
    """Text the model is run on to measure how much each weight column matters (the importance matrix)."""
    rows: list[dict]                 # prepare's rows: {"messages": [...]} rendered with the chat template, or {"text"}
    sources: list[str]               # what they came from, recorded in the imatrix file
    max_tokens: int = 16384


@dataclass(frozen=True)
class TableSettings:
    examples: int = 24               # held-out prompts each type answers for the exact-match column
    fit_gb: float | None = None      # pick the smallest type within this file size ...
    tolerance: float = 0.02          # ... whose exact match is at most this far below the unquantized GGUF's


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json as peft saved it ({} when there is none). Read as JSON, not with peft's
    PeftConfig: the preflight stays free of peft's import, and keys an older peft does not know are still seen."""
    config = Path(adapter_dir) / "adapter_config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def _is_dora(adapter_dir: Path) -> bool:
    """DoRA adapters have no llama.cpp GGUF adapter format: export writes the merged GGUFs only."""
    return bool(_adapter_config(adapter_dir).get("use_dora"))


def _renderable(tokenizer, conversations: list[list[dict]]) -> list[list[dict]]:
    """The conversations as the chat template accepts them (``parity.accepted_messages``), each once."""
    from finetune.gguf import parity

    out = []
    for conv in conversations:
        candidate = parity.accepted_messages(tokenizer, conv, add_generation_prompt=True)
        if candidate is not None and candidate not in out:
            out.append(candidate)
    return out


def _prompt_conversations(rows: list[dict]) -> list[list[dict]]:
    """Chat prompts for the chat-prompt and greedy checks: held-out conversations cut before their last answer."""
    convs = []
    for row in rows:
        msgs = row.get("messages")
        if not msgs:
            continue
        cut = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        if cut > 0 and any(m["role"] == "user" for m in msgs[:cut]):
            convs.append(msgs[:cut])
        if len(convs) >= 6:
            break
    # Shapes a held-out split may lack: a system prompt, several turns, non-ASCII text.
    convs += [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
         {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass? 🌱 草"}],
    ]
    unique = {json.dumps(c, sort_keys=True): c for c in convs}
    return list(unique.values())


# --------------------------------------------------------------------------------------------- stage

def run(recipe, upstream: artifacts.Upstream | None = None, *, recipe_path: str = "RECIPE",
        log=print) -> artifacts.Exported:
    """Export ``upstream.trained`` (default: this recipe's trained model, which must be fresh) to
    runs/<name>/export/; returns its record, read back from there. Prepare's splits, when there, give the parity
    checks' held-out rows and the importance matrix's calibration text. The sizes, parity figures, warnings and
    seconds are the manifest's ``summary`` (``artifacts.summary``).

    The new export is built in runs/<name>/.export.partial/ and replaces export/ only when every step and parity
    check passed: a failed export leaves the previous one as it was.
    """
    upstream = upstream if upstream is not None else artifacts.for_stage(recipe, "export", recipe_path)
    trained = upstream.trained
    adapter, full, base = trained.adapter, trained.model, trained.base_model
    if adapter is None and full is None:
        raise UserError(f"{recipe.run_dir('train')}/manifest.json names neither an adapter nor a model; "
                        f"run `finetune train {recipe_path}` again")
    for p in (adapter, full, base):
        if p is not None and not p.exists():
            raise UserError(f"{p} (from the train manifest) is missing; run `finetune train {recipe_path}` again")
    cfg = recipe.export
    heldout = artifacts.split_rows(upstream.prepared)
    inputs = {"train_manifest": trained.manifest_id,
              "weights": runs.file_fingerprint(adapter or full), "base_model": str(base)}
    out = recipe.run_dir("export")
    with runs.StageRun(recipe, "export", inputs=inputs, upstream=upstream.ids(), aside=True) as stage:
        result = export_model(
            name=recipe.name, out_dir=stage.work, base_dir=base, adapter_dir=adapter, model_dir=full,
            outtype=cfg.outtype, quantizations=list(cfg.quantizations), adapter_gguf=cfg.adapter_gguf,
            ollama=cfg.ollama, parity_checks=cfg.parity, min_top1_unquantized=cfg.min_top1_f16,
            heldout_rows=heldout, default_quant=artifacts.requested(recipe.serve, "quant"),
            system_prompt=artifacts.trained_system_prompt(recipe.data.system_prompt, upstream.prepared),
            trained_tokens=recipe.data.clean.max_tokens,
            table=TableSettings(examples=cfg.table_examples, fit_gb=cfg.fit_gb, tolerance=cfg.metric_tolerance),
            log=log, calibration=_calibration(recipe, upstream.prepared),
        )
        card.write_export_cards(recipe, trained, upstream.prepared, stage.work, served=result["served"],
                                parity=result["parity_summary"])

        work = Path(stage.work).resolve()

        def final(path: str | None) -> Path | None:  # a file written in the work folder, where it lies once swapped in
            # (the converter's paths are absolute, a relative runs_dir's work folder is not: compare them resolved)
            return out / Path(path).resolve().relative_to(work) if path else None

        stage.record(artifacts.Exported(
            merged=final(result["merged"]), gguf={q: final(p) for q, p in result["gguf"].items()},
            adapter_gguf=final(result["adapter_gguf"]), base_gguf=final(result["base_gguf"]),
            parity=final(result["parity"]), quantization=final(result["quantization"]),
            imatrix=final(result["imatrix"]), picked=result["picked"],
            quantization_chart=final(result["quantization_chart"]),
        ))
        stage.extra["summary"] = {"sizes": result["sizes"], "parity": result["parity_summary"],
                                  "warnings": result["warnings"], "seconds": result["seconds"]}
    return artifacts.from_folder(artifacts.Exported, out)


def _calibration(recipe, prepared: artifacts.Prepared | None) -> Calibration | None:
    """The training split (and export.imatrix_files) as calibration text, or None when export.imatrix is off."""
    cfg = recipe.export
    if not cfg.imatrix or all(q.upper() in IMATRIX_FREE for q in cfg.quantizations):
        return None
    rows, sources = list(artifacts.split_rows(prepared, "train") or []), []
    if rows:
        sources.append(f"{recipe.name} training split ({len(rows)} rows)")
    for name in cfg.imatrix_files:
        path = Path(name) if Path(name).is_absolute() else Path(recipe.base_dir) / name
        if not path.is_file():
            raise UserError(f"export.imatrix_files: {path} not found (paths are relative to the recipe file)")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{i}: not a JSON line (calibration .jsonl rows hold 'messages' or "
                                    "'text')") from None
                if isinstance(row, dict) and (row.get("messages") or row.get("text")):
                    rows.append(row)
        else:  # plain text: paragraphs
            rows += [{"text": p} for p in text.split("\n\n") if p.strip()]
        sources.append(path.name)
    if not rows:
        raise UserError("export.imatrix: no calibration text (the training split is missing and export.imatrix_files "
                        "is empty); run `finetune prepare`, add export.imatrix_files, or set export.imatrix: false")
    return Calibration(rows=rows, sources=sources, max_tokens=cfg.imatrix_tokens)

