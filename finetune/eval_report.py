"""The evaluation report (eval stage): one self-contained HTML file, plots embedded as PNG data URIs.

Plain functions over the eval stage's results (metrics.json content, example rows, train log rows); no recipe.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

from finetune.run import runs

# Metrics shown in the bar chart, all on a 0..1 scale (chrF is divided by 100 there).
CHART_METRICS = ["exact_match", "accuracy", "f1", "precision", "recall", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
TABLE_METRICS = CHART_METRICS + ["rougeLsum", "loss", "perplexity", "train_sample_loss",
                                 "answers_cut_at_max_new_tokens", "generation_seconds", "answer_words", "answer_lines",
                                 "preference_accuracy", "preference_accuracy_per_token", "logp_margin",
                                 "reward_accuracy", "reward_margin", "reward"]
LOWER_IS_BETTER = {"loss", "perplexity", "train_sample_loss", "answers_cut_at_max_new_tokens", "generation_seconds"}
# Of the table's metrics, those a column can be "best" at: the quality ones. Answer length and shape have no better
# direction, and generation time depends on where each column ran (torch here, llama.cpp for the GGUF).
BEST_OF = (set(TABLE_METRICS) - {"answer_words", "answer_lines", "generation_seconds"}) | {"tool_call_match"}
LABELS = {"exact_match": "exact match", "answers_cut_at_max_new_tokens": "answers cut at max_new_tokens",
          "train_sample_loss": "loss on training examples", "generation_seconds": "generation seconds",
          "chrf": "chrF", "bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
          "rougeLsum": "ROUGE-Lsum", "f1": "F1 (macro)", "precision": "precision (macro)", "recall": "recall (macro)",
          "answer_words": "answer length (words)", "answer_lines": "answer lines",
          "preference_accuracy": "preference accuracy (chosen more likely)",
          "preference_accuracy_per_token": "preference accuracy (per token)",
          "logp_margin": "log-prob margin (chosen - rejected)", "reward_accuracy": "reward accuracy (vs base)",
          "reward_margin": "reward margin (vs base)", "reward": "held-out reward (train.rewards)"}
COLORS = {"base": "#9aa5b1", "finetuned": "#2f6fde"}
GGUF_COLOR = "#e07b39"
NO_REFERENCE = "(none: a prompt-only row, scored by train.rewards)"  # the side-by-side cell of a row without one
SAMPLE_SIZE = 12  # side by side: every example some model got wrong, then this many more (disagreements first)
# Per-example scores that say right or wrong (1.0 or 0.0).
VERDICT_SCORES = ("exact_match", "correct", "tool_call_match")
LOSS_CURVE, REWARD_CURVE = "Training and validation loss", "Training and validation reward"  # the curve's caption


def write_report(out_dir: Path, result: dict[str, Any], examples: list[dict[str, Any]],
                 log_rows: list[dict[str, Any]], *, title: str,
                 preference_pairs: list[dict[str, Any]] | None = None,
                 quantization: dict[str, Any] | None = None, quantization_png: bytes | None = None) -> Path:
    """Write loss_curves.png (a GRPO run: reward_curves.png), metrics.png (preference.png for preference data) and
    report.html into out_dir; return the report's path. ``quantization``: export's quantization table
    (quantization.json) and its chart, shown as "Which GGUF to ship"."""
    out_dir = Path(out_dir)
    by_reward = reward_log(log_rows)
    loss_png = reward_curve_png(log_rows) if by_reward else loss_curve_png(log_rows)
    metrics_png = metric_chart_png(result)
    pref_png = preference_png(result, preference_pairs or [])
    forget_png = forgetting_png(result)
    if forget_png:
        _write_bytes(out_dir / "forgetting.png", forget_png)
    if loss_png:
        _write_bytes(out_dir / ("reward_curves.png" if by_reward else "loss_curves.png"), loss_png)
    if metrics_png:
        _write_bytes(out_dir / "metrics.png", metrics_png)
    if pref_png:
        _write_bytes(out_dir / "preference.png", pref_png)
    page = render_html(result, examples, title=title, loss_png=loss_png, metrics_png=metrics_png,
                       preference_png=pref_png, quantization=quantization, quantization_png=quantization_png,
                       forgetting_png=forget_png, reward_curve=by_reward)
    runs.atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI backend picked up by accident
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=144)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e6e9ee", linewidth=0.8)
    ax.set_axisbelow(True)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_curve_png(log_rows: list[dict[str, Any]]) -> bytes | None:
    """Training loss (and validation loss) against optimizer step, from train's log.jsonl rows."""
    train = [(r["step"], r["loss"]) for r in log_rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in log_rows if r.get("val_loss") is not None]
    return _curves_png(train, val, ("training loss", "validation loss"), best=min, ylabel="loss (nats / token)")


def _curves_png(train: list[tuple[int, float]], val: list[tuple[int, float]], labels: tuple[str, str], *, best,
                ylabel: str, title: str | None = None) -> bytes | None:
    """A training curve and a validation curve (its best point marked: ``best`` is min or max) against step."""
    if not train and not val:
        return None
    plt, fig, ax = _figure()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color=COLORS["finetuned"], linewidth=1.6,
                label=labels[0])
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], color=GGUF_COLOR, linewidth=1.6, marker="o", markersize=4,
                label=labels[1])
        point = best(val, key=lambda p: p[1])
        ax.annotate(f"best {point[1]:.3f}", point, textcoords="offset points", xytext=(4, 8), fontsize=8,
                    color=GGUF_COLOR)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return _png(plt, fig)


def reward_log(log_rows: list[dict[str, Any]]) -> bool:
    """Whether train's log.jsonl rows are a GRPO run's: its training lines carry the reward of the sampled
    completions, its validation lines the held-out reward (its loss is a policy-gradient surrogate, not a curve to
    read)."""
    return any("val_reward" in r or (r.get("loss") is not None and "reward" in r) for r in log_rows)


def reward_curve_png(log_rows: list[dict[str, Any]]) -> bytes | None:
    """A GRPO run's training reward (mean over each logged step's sampled completions) and validation reward
    (greedy answers to the held-out prompts) against optimizer step, from train's log.jsonl rows: the weighted sum
    of train.rewards, higher is better."""
    train = [(r["step"], r["reward"]) for r in log_rows if r.get("loss") is not None and r.get("reward") is not None]
    val = [(r["step"], r["val_reward"]) for r in log_rows if r.get("val_reward") is not None]
    return _curves_png(train, val, ("training reward (sampled completions)", "validation reward (greedy, held out)"),
                       best=max, ylabel="reward (train.rewards, weighted sum)", title=REWARD_CURVE)


def metric_chart_png(result: dict[str, Any]) -> bytes | None:
    """Grouped bars: each generation metric (0..1 scale) for each model variant."""
    variants = list(result["models"])
    keys = [k for k in CHART_METRICS if any(k in result["models"][v] for v in variants)]
    if not keys:
        return None
    plt, fig, ax = _figure()
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        values = [_scaled(k, result["models"][v].get(k)) for k in keys]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width=width * 0.92, color=_color(v), label=_variant_label(v))
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.015, f"{value:.2f}", ha="center", fontsize=7,
                    color="#3d4852")
    ax.set_xticks(range(len(keys)), [LABELS.get(k, k) + (" /100" if k == "chrf" else "") for k in keys], fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score (higher is better)")
    ax.legend(frameon=False, ncols=len(variants), loc="upper left", fontsize=8)
    return _png(plt, fig)


def _two_panels(*, grid: bool):
    """pyplot (Agg backend), a figure and its two side-by-side axes in the report's style (no top/right spines;
    ``grid``: light horizontal grid lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=144)
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        if grid:
            ax.grid(axis="y", color="#e6e9ee", linewidth=0.8)
        ax.set_axisbelow(True)
    return plt, fig, axes


def preference_png(result: dict[str, Any], pairs: list[dict[str, Any]]) -> bytes | None:
    """Two panels: how often each model prefers the chosen reply (summed and per-token log-probability, and the
    fine-tuned model's reward accuracy against the base); the distribution of the reward margins per pair."""
    pref = result.get("preference")
    if not pref or not pref.get("pairs"):
        return None
    plt, fig, (left, right) = _two_panels(grid=True)
    keys = [("preference_accuracy", "chosen more likely\n(summed log-prob)"),
            ("preference_accuracy_per_token", "chosen more likely\n(per token)"),
            ("reward_accuracy", "reward accuracy\n(vs base)")]
    names = list(pref["models"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [pref["models"][name].get(k) for k, _ in keys]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        bars = left.bar([x for x, _ in shown], [v for _, v in shown], width=width * 0.92, color=_color(name),
                        label=_variant_label(name))
        for bar, (_, v) in zip(bars, shown, strict=True):
            left.text(bar.get_x() + bar.get_width() / 2, v + 0.015, f"{v:.2f}", ha="center", fontsize=7)
    left.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    left.set_ylim(0, 1.12)
    left.set_ylabel(f"share of {pref['pairs']} held-out pairs")
    left.legend(frameon=False, fontsize=8, loc="upper left", ncols=len(names))
    margins = [p["reward_margin"] for p in pairs if p.get("reward_margin") is not None]
    if margins:
        right.hist(margins, bins=min(30, max(5, len(margins) // 2)), color=COLORS["finetuned"])
        right.axvline(0, color="#3d4852", linewidth=1)
        right.set_xlabel("reward margin, chosen - rejected (fine-tuned vs base)")
        right.set_ylabel("pairs")
    else:
        right.set_axis_off()
    return _png(plt, fig)


def forgetting_png(result: dict[str, Any]) -> bytes | None:
    """Two panels of the forgetting check: the fine-tuned model's top-1 agreement with the base on each general
    prompt (the verdict's bounds drawn), and each general paragraph's perplexity, base against fine-tuned."""
    forgot = result.get("forgetting")
    if not forgot or not forgot.get("per_prompt"):
        return None
    from finetune.verdict import FORGETTING_NONE, FORGETTING_STRONG

    plt, fig, (left, right) = _two_panels(grid=False)
    agree = sorted(p["top1_agreement"] for p in forgot["per_prompt"])
    left.bar(range(len(agree)), agree, color=COLORS["finetuned"], width=0.8)
    for bound, label in ((FORGETTING_NONE[0], "none above"), (FORGETTING_STRONG[0], "strong below")):
        left.axhline(bound, color="#3d4852", linewidth=0.8, linestyle="--")
        left.text(len(agree) - 0.5, bound + 0.01, label, ha="right", fontsize=7, color="#3d4852")
    left.set_ylim(0, 1.05)
    left.set_xlabel(f"general prompts, sorted (all: {forgot['top1_agreement']:.3f})")
    left.set_ylabel("top-1 agreement with the base")
    text = forgot["text"]
    base = [math.exp(x) for x in text["base"]["per_paragraph"]]
    tuned = [math.exp(x) for x in text["finetuned"]["per_paragraph"]]
    right.scatter(base, tuned, color=COLORS["finetuned"], s=16)
    top = max(base + tuned) * 1.05
    right.plot([0, top], [0, top], color=COLORS["base"], linewidth=1, label="unchanged")
    right.plot([0, top], [0, top * FORGETTING_NONE[2]], color="#3d4852", linewidth=0.8, linestyle="--",
               label=f"+{FORGETTING_NONE[2] - 1:.0%}")
    right.set_xlim(0, top)
    right.set_ylim(0, top * FORGETTING_NONE[2])
    right.set_xlabel("perplexity of the base, per general paragraph")
    right.set_ylabel("perplexity of the fine-tuned model")
    right.legend(frameon=False, fontsize=8, loc="upper left")
    return _png(plt, fig)


def _scaled(key: str, value: Any) -> float:
    if value is None:
        return 0.0
    return float(value) / 100.0 if key == "chrf" else float(value)


def _color(variant: str) -> str:
    return COLORS.get(variant, GGUF_COLOR)


def _variant_label(variant: str) -> str:
    return {"base": "base", "finetuned": "fine-tuned"}.get(variant, variant.replace("gguf-", "GGUF "))


# ---------------------------------------------------------------------------------------------- html
TEMPLATE = "eval_report.html.jinja"  # beside this module; the page's markup and CSS


def render_html(result: dict[str, Any], examples: list[dict[str, Any]], *, title: str, loss_png: bytes | None,
                metrics_png: bytes | None, preference_png: bytes | None = None,
                quantization: dict[str, Any] | None = None, quantization_png: bytes | None = None,
                forgetting_png: bytes | None = None, reward_curve: bool = False) -> str:
    """report.html: the values below, laid out by the Jinja template (autoescaped, so no data becomes markup).
    ``reward_curve``: ``loss_png`` holds a GRPO run's reward curves (``reward_curve_png``), not loss curves."""
    import jinja2

    verdict = result["verdict"]
    improved = verdict.get("improved", {})
    status = improved.get("status", "unknown")
    gen = result["generation"]
    pref = result.get("preference")
    sample = pick_sample(examples) if examples and examples[0].get("answers") else []
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template(TEMPLATE).render(
        title=title, examples_count=result["examples"], split=result["split"],
        decoding="greedy" if gen["greedy"] else f"temperature {gen['temperature']}",
        max_new_tokens=gen["max_new_tokens"], status=status, headline=_headline(status),
        summary=verdict.get("summary", ""), flags=_flags(verdict), notes=_notes(result, verdict, improved),
        plots=[_plot(REWARD_CURVE, loss_png, "No train log with rewards was found.") if reward_curve else
               _plot(LOSS_CURVE, loss_png, "No train log with losses was found."),
               _plot("Generation metrics by model", metrics_png, "No generation metric was asked for.")],
        preference=pref and {"beta": pref["beta"], "plot": _plot(
            f"Preferences on {pref['pairs']} held-out pairs ({pref['kind']})", preference_png,
            "No held-out pair to score.")},
        metric_columns=[_variant_label(n) for n in result["models"]], metric_rows=metric_rows(result),
        wilson=[f"{_variant_label(k)} {lo:.1%} to {hi:.1%}" for k, (lo, hi) in (improved.get("wilson95") or {}).items()],
        answer_columns=[_variant_label(n) for n in sample[0]["answers"]] if sample else [],
        sample=[_example_row(x, list(sample[0]["answers"])) for x in sample], examples_total=len(examples),
        wrong_total=sum(map(_wrong_somewhere, sample)),
        rules=result.get("rules", {}), sources=result.get("metric_sources", {}),
        models=[(_variant_label(k), str(v.get("model"))) for k, v in result["models"].items()],
        quantization=quantization and _quantization_view(quantization, quantization_png),
        forgetting=_forgetting_view(result, forgetting_png),
    )


def _forgetting_view(result: dict[str, Any], png: bytes | None) -> dict[str, Any] | None:
    """The forgetting check's verdict, figures, plot and the general prompts where the models agree least."""
    forgot, found = result.get("forgetting"), result["verdict"].get("forgetting")
    if not forgot or not found:
        return None
    worst = sorted(forgot["per_prompt"], key=lambda p: p["top1_agreement"])[:5]
    return {"status": found["status"], "summary": found["summary"], "prompts": forgot["prompts"],
            "tokens": forgot["answer_tokens"], "paragraphs": forgot["paragraphs"], "max_tokens": forgot["answer_max_tokens"],
            "worst": [(p["prompt"], f"{p['top1_agreement']:.2f}", f"{p['kl']:.3f}") for p in worst],
            "plot": _plot("Forgetting: general prompts and general text", png, "Nothing to plot.")}


def _quantization_view(quant: dict[str, Any], png: bytes | None) -> dict[str, Any]:
    """Export's quantization table as rows of text cells, the type it picked and why, and its chart."""
    from finetune.console import mib
    from finetune.gguf.quant_table import format_measure

    budget = quant.get("fit_gb")
    picked = quant.get("picked") if budget is not None else None  # without a budget export picks nothing
    rows = [{"type": r["type"], "picked": r["type"] == picked, "cells": [
        "yes" if r.get("imatrix") else "no", mib(r["bytes"]), format_measure(r.get("top1_agreement"), ".3f"),
        format_measure(r.get("kl_mean"), ".4f"), format_measure(r.get("ppl_gguf"), ".2f"),
        None if r.get("exact_match") is None else f"{r['exact_match']:.2f} (n={r.get('examples')})",
        format_measure(r.get("decode_tokens_per_s"), ".0f")]} for r in quant.get("rows") or []]
    return {"rows": rows, "picked": picked, "why": quant.get("why"),
            "budget": budget, "plot": _plot("GGUF types: size vs quality", png,
                                            "No type had a quality figure to plot.")}


def _headline(status: str) -> str:
    return {"improved": "Fine-tuning helped", "worse": "Fine-tuning made things worse",
            "no clear difference": "No clear difference at this sample size"}.get(status, "Verdict unavailable")


def _flags(verdict: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(name, raised, finding) for the over- and underfitting checks that ran."""
    return [(name, bool(item.get("flag")), item.get("finding", "").split(": ", 1)[-1])
            for name in ("overfitting", "underfitting") if (item := verdict.get(name))]


def _notes(result: dict[str, Any], verdict: dict[str, Any], improved: dict[str, Any]) -> list[tuple[str, str]]:
    """(badge, text) for the loss, preference and GGUF findings that are not the headline itself, and how many
    examples the reference metrics count when some have no reference (a GRPO run's prompt-only rows)."""
    notes = []
    if "loss" in verdict and verdict["loss"] is not improved:
        notes.append(("loss", verdict["loss"]["summary"]))
    if "preference" in verdict and verdict["preference"] is not improved:
        notes.append(("preferences", verdict["preference"]["summary"]))
    if "forgetting" in verdict:
        notes.append((f"forgetting: {verdict['forgetting']['status']}", verdict["forgetting"]["summary"]))
    with_reference = result.get("examples_with_reference")
    if with_reference is not None and with_reference < result["examples"]:
        notes.append(("references", f"{result['examples'] - with_reference} of the {result['examples']} examples "
                      "are prompt-only rows, scored by train.rewards only: the reference metrics (exact match...) "
                      f"count the other {with_reference}."))
    if "gguf" in verdict:
        notes.append(("GGUF", verdict["gguf"]["summary"]))
    elif result["gguf"]["status"] != "scored":
        notes.append(("GGUF", f"not scored: {result['gguf']['reason']}"))
    return notes


def _plot(caption: str, png: bytes | None, missing: str) -> dict[str, str | None]:
    return {"caption": caption, "data": base64.b64encode(png).decode("ascii") if png else None, "missing": missing}


def metric_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric any model has: its label and per model the shown value (None: not measured) and whether
    it is the best of several (BEST_OF metrics only); a GRPO run's held-out reward, then each reward's mean."""
    models = result["models"]
    names = list(models)
    per_reward = sorted({k for n in names for k in models[n] if k.startswith("reward/")})
    rows = []
    for k in (k for k in TABLE_METRICS + per_reward if any(_metric(models[n], k) is not None for n in names)):
        values = [_metric(models[n], k) for n in names]
        present = [v for v in values if isinstance(v, (int, float))]
        best = ((min(present) if k in LOWER_IS_BETTER else max(present))
                if len(present) > 1 and (k in BEST_OF or k in per_reward) else None)
        label = LABELS.get(k, k)
        if k == "generation_seconds" and any(models[n].get("runtime") == "llama.cpp" for n in names):
            label += " (GGUF: with loading it)"
        rows.append({"label": label, "cells": [{"text": _cell(k, v), "best": best is not None and v == best}
                                               for v in values]})
    return rows


def _metric(model: dict[str, Any], key: str) -> Any:
    """A model's value of a metric; a GGUF column's generation time is its whole time (it only generates)."""
    if key == "generation_seconds" and model.get("runtime") == "llama.cpp":
        return model.get("generation_seconds", model.get("seconds"))
    return model.get(key)


def _cell(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if key in ("exact_match", "accuracy"):
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.2f}" if key in ("chrf", "perplexity", "generation_seconds") else f"{value:.3f}"
    return str(value)


def pick_sample(examples: list[dict[str, Any]], k: int = SAMPLE_SIZE) -> list[dict[str, Any]]:
    """The side-by-side rows: every example some model got wrong (exact match, accuracy or tool-call match), then
    up to ``k`` more, those where the models' answers differ first, in file order."""
    wrong = [x for x in examples if _wrong_somewhere(x)]
    rest = [x for x in examples if not any(x is w for w in wrong)]
    differ = [x for x in rest if len(set(x["answers"].values())) > 1]
    same = [x for x in rest if len(set(x["answers"].values())) <= 1]
    return wrong + (differ + same)[:k]


def _wrong_somewhere(x: dict[str, Any]) -> bool:
    return any(_missed(scores) for scores in x.get("scores", {}).values())


def _missed(scores: dict[str, float]) -> bool:
    return any(scores.get(key) is not None and not scores[key] for key in VERDICT_SCORES)


def _example_row(x: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """One row of the side-by-side table: the last user turn, the reference, and each model's answer with its
    scores and whether it matched (the cell's colour)."""
    user = next((m["content"] for m in reversed(x.get("messages", [])) if m.get("role") == "user"), x["prompt"])
    answers = []
    for n in names:
        scores = x["scores"].get(n, {})
        verdicts = [scores[key] for key in VERDICT_SCORES if scores.get(key) is not None]
        match = all(verdicts) if verdicts else None
        cut = " (cut at max_new_tokens)" if x.get("finish_reason", {}).get(n) == "length" else ""
        answers.append({"text": _clip(x["answers"][n]), "match": "" if match is None else ("ok" if match else "miss"),
                        "scores": ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + cut})
    reference = NO_REFERENCE if x["reference"] is None else x["reference"]
    return {"prompt": _clip(user), "reference": _clip(reference), "answers": answers}


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " …"
