"""`finetune plan RECIPE`: will this recipe fit in memory, and what is the cheapest change that makes it fit?

Before an evening of training, the planner estimates the peak memory of a training step from the model's
config.json alone (no weights are downloaded), for the named card, this machine, and the card the recipe names.
The memory model itself (weights, adapter, gradients, optimizer, activations, logits, framework; the time per
1k examples; the suggestions) is finetune/training/memory.py, pure functions shared with ``finetune train``.
Here: the budget of this machine, the prepared data's measured lengths, ``run`` (a recipe -> the plan) and the
printed report.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from finetune.console import count, duration, gib, table
from finetune.data.render import IGNORE_INDEX
from finetune.errors import UserError
from finetune.models import load_model_config
from finetune.training import loss
from finetune.training.memory import (  # noqa: F401  (plan.X names kept for scripts and tests)
    MID_RANGE_GPU_FLOPS,
    GiB,
    MemoryEstimate,
    ModelDims,
    Settings,
    Suggestion,
    estimate,
    example_unit,
    fits,
    plan_for_budget,
    seconds_per_1k_examples,
    sequences_per_example,
    settings_for,
    sft_equivalent,
    step_sequences,
    suggest,
    train_flops_per_token,
)

# config.json snapshots of the models the shipped recipes name (<org>--<name>.json): plan reads one when the Hub's copy
# cannot be read (offline, no login for a gated model), and says so in its "config from" line.
CONFIG_SNAPSHOTS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs"

# A named card (8, 12, 16, 24 "GB") is treated as that many GiB (an "8 GB" card reports 8192 MiB), and we
# keep this share of it as the budget: drivers, a desktop session and fragmentation take the rest.
USABLE_SHARE = 0.95


# -------------------------------------------------------------------------------------------------- device
def detect_budget() -> tuple[int, str, str]:
    """(bytes available, device kind, description): free CUDA memory, else available system RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            name = torch.cuda.get_device_name(0)
            return int(free), "cuda", f"{name} ({free / GiB:.1f} of {total / GiB:.1f} GiB free)"
    except Exception:  # a broken CUDA install must not stop a memory estimate
        pass
    import psutil

    avail = int(psutil.virtual_memory().available)
    return avail, "cpu", f"CPU RAM ({avail / GiB:.1f} GiB available)"


# ------------------------------------------------------------------------------------------------- config
def bundled_config(model_id: str) -> Path | None:
    """The config.json snapshot of a Hub model in CONFIG_SNAPSHOTS (shown relative to the current folder when it
    is below it), or None."""
    if model_id.count("/") != 1:
        return None
    path = CONFIG_SNAPSHOTS / f"{model_id.replace('/', '--')}.json"
    if not path.is_file():
        return None
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def model_config(recipe, config_path: str | Path | None) -> tuple[dict, str]:
    """The model's config and where it came from: --config, the model folder or the Hub (the Hub client's retry
    and warning lines kept off the console), else this model's bundled snapshot."""
    from finetune.console import quiet_hub

    try:
        with quiet_hub():
            return load_model_config(recipe.model.id, recipe.model.revision, base_dir=recipe.base_dir,
                                     config_path=config_path, gated=recipe.model.gated)
    except UserError:
        snapshot = bundled_config(recipe.model.id) if config_path is None else None
        if snapshot is None:
            raise
    config, _ = load_model_config(recipe.model.id, config_path=snapshot)
    return config, f"the snapshot {snapshot}, as the Hub's copy could not be read; --config PATH to give another"


# ---------------------------------------------------------------------------------------------- recipe glue
def prepared_stats(recipe) -> dict[str, float] | None:
    """From prepare's tokenized train split (when it has run): mean tokens per example and the 95th percentile
    of the share of an example's positions that are trained (finetune train computes logits only there). None when
prepare has not run or its output is stale for this recipe."""
    from finetune.run import artifacts

    try:  # prepared from other data or settings (stale): its lengths say nothing about this recipe
        tokenized = artifacts.load(recipe, artifacts.Prepared).tokenized["train"]
    except UserError:
        return None
    if not tokenized.exists():
        return None
    try:
        from datasets import load_from_disk

        ds = load_from_disk(str(tokenized))
        lengths = list(ds["length"])
        fractions = sorted(sum(1 for x in labels if x != IGNORE_INDEX) / max(1, len(labels)) for labels in ds["labels"])
    except Exception:  # an unreadable prepare output only costs us the measured numbers
        return None
    if not lengths:
        return None
    return {"mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "trained_fraction_p95": fractions[int(0.95 * (len(fractions) - 1))]}


def tokens_per_example(recipe, stats: dict[str, float] | None = None) -> tuple[float, str]:
    """Mean tokens per training example: measured by prepare when it has run, else assumed half of max_tokens."""
    stats = stats if stats is not None else prepared_stats(recipe)
    if stats:
        return stats["mean_tokens"], "measured by prepare"
    return recipe.data.clean.max_tokens / 2, "assumed: half of data.clean.max_tokens"


def run(recipe, *, gpu_gb: float | None = None, config_path: str | Path | None = None,
        cards: list[float] | None = None, gpus: int | None = None) -> dict:
    """Plan a recipe for the named card (gpu_gb), else the detected device, plus the card the recipe names.
    ``gpus``: that many of the first card (per GPU; sharded with FSDP2 when more than one), and the launcher."""
    config, source = model_config(recipe, config_path)
    from finetune import refusals

    refusals.check(config, method=recipe.train.method, adapter_gguf=recipe.export.adapter_gguf)
    dims = ModelDims.from_config(config)
    targets: list[tuple[str, str, int]] = []  # (label, device, budget bytes)
    if gpu_gb is not None:
        targets.append((f"{gpu_gb:g} GB GPU", "cuda", int(gpu_gb * GiB * USABLE_SHARE)))
    else:
        budget, device, desc = detect_budget()
        if gpus is not None and device != "cuda":
            raise UserError(f"--gpus {gpus}: no GPU was found on this machine to size them by; add --gpu-gb X "
                            "(the memory of each GPU, e.g. --gpu-gb 24).")
        targets.append((f"this machine: {desc}", device, int(budget * (USABLE_SHARE if device == "cuda" else 1))))
    for card in ([recipe.card_gb] if recipe.card_gb and recipe.card_gb != gpu_gb else []) + list(cards or []):
        targets.append((f"{card:g} GB GPU (card_gb)" if card == recipe.card_gb else f"{card:g} GB GPU", "cuda",
                        int(card * GiB * USABLE_SHARE)))
    stats = prepared_stats(recipe)
    mean_tokens, mean_source = tokens_per_example(recipe, stats)
    results = []
    from finetune import hardware

    cpu_bf16, arch = hardware.cpu_has_fast_bf16(), config.get("architectures")
    launcher = None
    for k, (label, device, budget) in enumerate(targets):
        settings = settings_for(recipe, device, cpu_fast_bf16=cpu_bf16)
        settings = replace(settings, chunked_loss=settings.chunked_loss and loss.chunkable_architecture(arch))
        if stats and stats["max_tokens"] < settings.seq_len:
            settings = replace(settings, seq_len=int(stats["max_tokens"]))
        if stats and settings.packed and settings.objective != "grpo":  # GRPO: logits at its completions
            settings = replace(settings, logit_fraction=stats["trained_fraction_p95"])
        if device == "cpu" and settings.method == "qlora":
            settings = replace(settings, method="lora")
        if k == 0 and gpus is not None:
            launcher = _launcher(dims, settings, budget, recipe.train.gradient_checkpointing, gpus)
            settings = replace(settings, processes=gpus)
            label = f"{gpus} x {label}" + (" (per GPU, FSDP2)" if gpus > 1 else "")
        r = plan_for_budget(dims, settings, budget, recipe.train.gradient_checkpointing)
        r["target"] = label
        r["device"] = device
        if stats and settings.seq_len < recipe.data.clean.max_tokens:
            r["estimate"]["notes"].append(
                f"sequence length: the longest prepared example ({settings.seq_len} tokens), not data.clean.max_tokens")
        if settings.logit_fraction < 1:
            r["estimate"]["notes"].append(
                f"logits only at trained positions: {settings.logit_fraction:.0%} of a sequence (95th percentile "
                "measured by prepare; packed batches)")
        if settings.objective != "grpo":  # GRPO's log-probabilities take the full logits: its note says so
            r["estimate"]["notes"].append(
                f"loss: logits {loss.chunk_tokens(dims.vocab_size)} tokens at a time" if settings.chunked_loss
                else "loss: full logits (LoRA on lm_head, or an unknown class)")
        if device == "cpu" and recipe.train.method == "qlora":
            r["estimate"]["notes"].append("qlora needs a CUDA GPU (bitsandbytes 4-bit): this is the estimate for "
                                          "train.method=lora, what this machine can run")
        results.append(r)
    gpu_settings = settings_for(recipe, "cuda", cpu_fast_bf16=cpu_bf16, gradient_checkpointing=any(
        r["settings"]["gradient_checkpointing"] for r in results if r["device"] == "cuda"))
    seconds = seconds_per_1k_examples(dims, replace(gpu_settings, seq_len=int(mean_tokens)), mean_tokens)
    return {
        "recipe": recipe.name,
        "model": recipe.model.id,
        "config_source": source,
        "dims": asdict(dims),
        "total_params": dims.total_params,
        "active_params": dims.active_params if dims.is_moe else None,
        "prepared": stats,
        "results": results,
        "gpus": gpus,
        "launcher": launcher,
        "time_estimate": {
            "seconds_per_1k_examples": seconds,
            "tokens_per_example": mean_tokens,
            "tokens_per_example_source": mean_source,
            "assumed_flops_per_second": MID_RANGE_GPU_FLOPS,
            "label": "estimate, not a measurement: assumes a mid-range GPU (RTX 3060/4060 Ti/4070 class) sustaining "
                     f"{MID_RANGE_GPU_FLOPS / 1e12:.0f} TFLOP/s of bf16 training",
        },
    }


def _launcher(dims, settings: Settings, budget: int, checkpointing: str, gpus: int) -> dict:
    """How to launch on ``gpus`` GPUs: data-parallel when the whole model fits each GPU (no gathering: faster),
    else FSDP2 when the sharded model fits, else nothing fits."""
    one = plan_for_budget(dims, settings, budget, checkpointing)
    many = plan_for_budget(dims, replace(settings, processes=gpus), budget, checkpointing) if gpus > 1 else one
    if gpus == 1:
        how = ("finetune train RECIPE", "one GPU") if one["fits"] else (None, "does not fit one GPU")
    elif one["fits"]:
        how = (f"accelerate launch --config_file recipes/accelerate/multi-gpu.yaml --num_processes {gpus} -m finetune "
               "train RECIPE", "data-parallel: the whole model fits each GPU")
    elif many["fits"]:
        how = (f"accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes {gpus} -m finetune "
               "train RECIPE", f"FSDP2: the model fits only sharded over {gpus} GPUs")
    else:
        how = (None, f"does not fit {gpus} GPUs even sharded")
    return {"command": how[0], "why": how[1], "unsharded_total": one["estimate"]["total"],
            "sharded_total": many["estimate"]["total"], "fits": how[0] is not None}


# --------------------------------------------------------------------------------------------------- CLI
def memory_table(e: dict, budget: int, fitting: bool) -> str:
    """Where the memory goes (an estimate's parts) and the total against the usable budget."""
    rows = []
    for key in ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "generation", "framework"):
        if key == "generation" and not e.get(key):
            continue  # GRPO's rollouts, where they need more than the training pass
        note = f"({count(e['trainable_params'])} trainable params)" if key == "adapter" and e["trainable_params"] else ""
        if key == "generation":
            note = "rollouts' KV cache beyond the training pass"
        rows.append([key, gib(e[key]), note])
    verdict = "fits" if fitting else "DOES NOT FIT"
    spare = f" ({gib(budget - e['total'])} spare)" if fitting else ""
    rows.append(["total", gib(e["total"]), f"of {gib(budget)} usable -> {verdict}{spare}"])
    return table(["part", "memory", "note"], rows, right=["memory"], indent=4, header=False)


def format_plan(plan: dict) -> str:
    d = plan["results"][0]["settings"]
    moe = (f", {count(plan['active_params'])} active per token ({plan['dims']['experts_per_token']} of "
           f"{plan['dims']['num_experts']} experts)") if plan.get("active_params") else ""
    lines = [f"plan for {plan['recipe']}: {plan['model']} ({count(plan['total_params'])} params{moe}; config from "
             f"{plan['config_source']})"]
    method = d["method"] + ("" if d["method"] == "full" else f" r={d['lora_r']} on {d['target_modules']}")
    where = "the longest prepared example" if plan.get("prepared") else "data.clean.max_tokens"
    unit = example_unit(d["objective"])
    if unit == "prompt":  # GRPO: each prompt's completions, a prompt and a completion each
        batch = (f"{d['batch_size']} prompts x {d['generations']} completions "
                 f"({d['batch_size'] * d['generations']} sequences) x {d['seq_len']} + {d['completion_tokens']} "
                 f"tokens (worst case: every prompt at {where}, every completion at train.grpo.max_new_tokens)")
    else:
        batch = (f"{d['batch_size']}" + (f" pairs ({2 * d['batch_size']} sequences)" if unit == "pair" else "")
                 + f" x {d['seq_len']} tokens (worst case: every sequence at {where})")
    lines.append(f"  {method}; micro-batch {batch}, grad_accum {d['grad_accum']}, optimizer {d['optimizer']}")
    for r in plan["results"]:
        e, s = r["estimate"], r["settings"]
        lines.append("")
        lines.append(f"  on {r['target']}  [{s['device']}, weights {s['weight_dtype'] if s['method'] != 'qlora' else 'nf4'}, "
                     f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}]")
        lines.append(memory_table(e, r["budget"], r["fits"]))
        for note in e["notes"]:
            lines.append(f"    note: {note}")
        if r["suggestions"]:
            lines.append("    to make it fit, in order of least quality cost (each on top of the previous):")
            for i, sug in enumerate(r["suggestions"], 1):
                lines.append(f"      {i}. {sug['change']}: {' '.join(sug['overrides'])} -> {gib(sug['total'])}"
                             + ("  FITS" if sug["fits"] else ""))
            if not r["suggestions"][-1]["fits"]:
                lines.append("      still too big: pick a smaller model (see recipes/models/) or a larger card")
    if plan.get("launcher"):
        la = plan["launcher"]
        lines.append("")
        lines.append(f"  on {plan['gpus']} GPU{'s' if plan['gpus'] > 1 else ''}: {la['why']} (per GPU "
                     f"{gib(la['sharded_total'])} sharded, "
                     f"{gib(la['unsharded_total'])} whole)")
        if la["command"]:
            lines.append(f"    launch: {la['command']}")
    t = plan["time_estimate"]
    secs = t["seconds_per_1k_examples"]
    when = duration(secs)
    lines.append("")
    lines.append(f"  time per 1k examples on a GPU: ~{when} ({t['label']}; {t['tokens_per_example']:.0f} tokens/example, "
                 f"{t['tokens_per_example_source']})")
    return "\n".join(lines)
