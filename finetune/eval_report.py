"""The evaluation report (eval stage): one self-contained HTML file, plots embedded as PNG data URIs.

Plain functions over the eval stage's results (metrics.json content, example rows, train log rows); no recipe.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from finetune import runs

# Metrics shown in the bar chart, all on a 0..1 scale (chrF is divided by 100 there).
CHART_METRICS = ["exact_match", "accuracy", "f1", "precision", "recall", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
TABLE_METRICS = CHART_METRICS + ["rougeLsum", "loss", "perplexity", "train_sample_loss",
                                 "answers_cut_at_max_new_tokens", "generation_seconds", "answer_words", "answer_lines",
                                 "preference_accuracy", "preference_accuracy_per_token", "logp_margin",
                                 "reward_accuracy", "reward_margin"]
LOWER_IS_BETTER = {"loss", "perplexity", "train_sample_loss", "answers_cut_at_max_new_tokens", "generation_seconds"}
LABELS = {"exact_match": "exact match", "answers_cut_at_max_new_tokens": "answers cut at max_new_tokens",
          "train_sample_loss": "loss on training examples", "generation_seconds": "generation seconds",
          "chrf": "chrF", "bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
          "rougeLsum": "ROUGE-Lsum", "f1": "F1 (macro)", "precision": "precision (macro)", "recall": "recall (macro)",
          "answer_words": "answer length (words)", "answer_lines": "answer lines",
          "preference_accuracy": "preference accuracy (chosen more likely)",
          "preference_accuracy_per_token": "preference accuracy (per token)",
          "logp_margin": "log-prob margin (chosen - rejected)", "reward_accuracy": "reward accuracy (vs base)",
          "reward_margin": "reward margin (vs base)"}
COLORS = {"base": "#9aa5b1", "finetuned": "#2f6fde"}
GGUF_COLOR = "#e07b39"
SAMPLE_SIZE = 12


def write_report(out_dir: Path, result: dict[str, Any], examples: list[dict[str, Any]],
                 log_rows: list[dict[str, Any]], *, title: str,
                 preference_pairs: list[dict[str, Any]] | None = None) -> Path:
    """Write loss_curves.png, metrics.png (preference.png for preference data) and report.html into out_dir;
    return the report's path."""
    out_dir = Path(out_dir)
    loss_png = loss_curve_png(log_rows)
    metrics_png = metric_chart_png(result)
    pref_png = preference_png(result, preference_pairs or [])
    if loss_png:
        _write_bytes(out_dir / "loss_curves.png", loss_png)
    if metrics_png:
        _write_bytes(out_dir / "metrics.png", metrics_png)
    if pref_png:
        _write_bytes(out_dir / "preference.png", pref_png)
    page = render_html(result, examples, title=title, loss_png=loss_png, metrics_png=metrics_png,
                       preference_png=pref_png)
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
    if not train and not val:
        return None
    plt, fig, ax = _figure()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color=COLORS["finetuned"], linewidth=1.6,
                label="training loss")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], color=GGUF_COLOR, linewidth=1.6, marker="o", markersize=4,
                label="validation loss")
        best = min(val, key=lambda p: p[1])
        ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(4, 8), fontsize=8,
                    color=GGUF_COLOR)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend(frameon=False)
    return _png(plt, fig)


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


def preference_png(result: dict[str, Any], pairs: list[dict[str, Any]]) -> bytes | None:
    """Two panels: how often each model prefers the chosen reply (summed and per-token log-probability, and the
    fine-tuned model's reward accuracy against the base); the distribution of the reward margins per pair."""
    pref = result.get("preference")
    if not pref or not pref.get("pairs"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=144)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", color="#e6e9ee", linewidth=0.8)
        ax.set_axisbelow(True)
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


def _scaled(key: str, value: Any) -> float:
    if value is None:
        return 0.0
    return float(value) / 100.0 if key == "chrf" else float(value)


def _color(variant: str) -> str:
    return COLORS.get(variant, GGUF_COLOR)


def _variant_label(variant: str) -> str:
    return {"base": "base", "finetuned": "fine-tuned"}.get(variant, variant.replace("gguf-", "GGUF "))


# ---------------------------------------------------------------------------------------------- html
CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --good:#1f9d55; --bad:#cc1f1a; --meh:#8a6d00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color:var(--ink);
       background:var(--bg); }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 12px; }
.sub { color: var(--muted); margin: 0 0 20px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; }
.verdict { border-left: 6px solid var(--meh); }
.verdict.improved { border-left-color: var(--good); } .verdict.worse { border-left-color: var(--bad); }
.verdict .headline { font-size: 19px; font-weight: 600; margin: 0 0 6px; }
.badge { display:inline-block; padding: 1px 9px; border-radius: 99px; font-size: 12px; font-weight: 600; margin-right: 6px;
         background:#eef2f7; color:var(--muted); vertical-align: 2px; }
.badge.yes { background:#fdecea; color:var(--bad); } .badge.no { background:#e6f6ec; color:var(--good); }
.findings { margin: 10px 0 0; padding: 0; list-style: none; } .findings li { margin: 6px 0; }
.grid { display:grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 900px) { .grid { grid-template-columns: 1fr; } }
.grid img { width: 100%; height: auto; display:block; }
table { border-collapse: collapse; width: 100%; background:#fff; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 13px; color: var(--muted); font-weight: 600; background:#fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th.num { text-align: right; }
td.best { font-weight: 700; }
.examples td { font-size: 13px; } .examples pre { margin:0; white-space: pre-wrap; word-break: break-word;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.ok { background: #f0faf3; } .miss { background: #fff6f5; }
.score { color: var(--muted); font-size: 11.5px; margin-top: 4px; }
.note { color: var(--muted); font-size: 13px; }
details summary { cursor: pointer; color: var(--muted); font-size: 13px; }
code { background:#eef2f7; padding: 1px 5px; border-radius: 4px; font-size: 12.5px; }
"""


def render_html(result: dict[str, Any], examples: list[dict[str, Any]], *, title: str, loss_png: bytes | None,
                metrics_png: bytes | None, preference_png: bytes | None = None) -> str:
    e = html.escape
    verdict = result["verdict"]
    improved = verdict.get("improved", {})
    status = improved.get("status", "unknown")
    gen = result["generation"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        f"<p class='sub'>{result['examples']} held-out examples from the <b>{e(result['split'])}</b> split, "
        f"{'greedy' if gen['greedy'] else 'temperature ' + str(gen['temperature'])} decoding, at most "
        f"{gen['max_new_tokens']} new tokens, the same prompts and settings for every model.</p>",
        # verdict
        f"<section class='card verdict {e(status.replace(' ', '-'))}'>",
        f"<p class='headline'>{e(_headline(status))}</p><div>{e(verdict.get('summary', ''))}</div>",
        "<ul class='findings'>",
        _finding("overfitting", verdict.get("overfitting")),
        _finding("underfitting", verdict.get("underfitting")),
    ]
    if "loss" in verdict and verdict["loss"] is not improved:
        parts.append(f"<li><span class='badge'>loss</span>{e(verdict['loss']['summary'])}</li>")
    if "preference" in verdict and verdict["preference"] is not improved:
        parts.append(f"<li><span class='badge'>preferences</span>{e(verdict['preference']['summary'])}</li>")
    if "gguf" in verdict:
        parts.append(f"<li><span class='badge'>GGUF</span>{e(verdict['gguf']['summary'])}</li>")
    elif result["gguf"]["status"] != "scored":
        parts.append(f"<li><span class='badge'>GGUF</span>not scored: {e(result['gguf']['reason'])}</li>")
    parts.append("</ul></section>")

    # plots
    parts.append("<h2>Curves and scores</h2><div class='grid'>")
    parts.append(_image_card("Training and validation loss", loss_png, "No train log with losses was found."))
    parts.append(_image_card("Generation metrics by model", metrics_png, "No generation metric was asked for."))
    parts.append("</div>")
    if result.get("preference"):
        pref = result["preference"]
        parts.append(_image_card(f"Preferences on {pref['pairs']} held-out pairs ({pref['kind']})", preference_png,
                                 "No held-out pair to score."))
        parts.append("<p class='note'>Each reply is scored by the summed log-probability of its tokens. The reward "
                     f"is beta ({pref['beta']}) times the fine-tuned minus the base log-probability, as in DPO and "
                     "KTO; the base is the reference, so its own rewards are 0. Every pair is in "
                     "<code>preference.jsonl</code>.</p>")

    # metric table
    parts.append("<h2>Metrics</h2>" + metric_table(result))
    wilson = improved.get("wilson95")
    if wilson:
        parts.append("<p class='note'>95% Wilson intervals of exact match: " + ", ".join(
            f"{_variant_label(k)} {lo:.1%} to {hi:.1%}" for k, (lo, hi) in wilson.items()) + ".</p>")

    # examples
    parts.append("<h2>Side by side</h2>" + examples_table(result, examples))

    # rules and provenance
    parts.append("<h2>How to read this</h2><div class='card'><ul>")
    for key, rule in result.get("rules", {}).items():
        parts.append(f"<li><b>{e(key)}</b>: {e(rule)}</li>")
    parts.append("</ul>")
    sources = result.get("metric_sources", {})
    if sources:
        parts.append("<p class='note'>Metric implementations: " + "; ".join(
            f"{e(k)} from <code>{e(v)}</code>" for k, v in sources.items()) + ".</p>")
    models = result["models"]
    parts.append("<p class='note'>Models: " + "; ".join(
        f"{e(_variant_label(k))}: <code>{e(str(v.get('model')))}</code>" for k, v in models.items()) + ".</p>")
    parts.append("</div></main></body></html>")
    return "\n".join(parts)


def _headline(status: str) -> str:
    return {"improved": "Fine-tuning helped", "worse": "Fine-tuning made things worse",
            "no clear difference": "No clear difference at this sample size"}.get(status, "Verdict unavailable")


def _finding(name: str, item: dict[str, Any] | None) -> str:
    if not item:
        return ""
    flag = item.get("flag")
    badge = f"<span class='badge {'yes' if flag else 'no'}'>{html.escape(name)}: {'yes' if flag else 'no'}</span>"
    text = item.get("finding", "").split(": ", 1)[-1]
    return f"<li>{badge}{html.escape(text)}</li>"


def _image_card(caption: str, png: bytes | None, missing: str) -> str:
    if not png:
        return f"<div class='card'><b>{html.escape(caption)}</b><p class='note'>{html.escape(missing)}</p></div>"
    data = base64.b64encode(png).decode("ascii")
    return (f"<div class='card'><b>{html.escape(caption)}</b>"
            f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'></div>")


def metric_table(result: dict[str, Any]) -> str:
    models = result["models"]
    names = list(models)
    keys = [k for k in TABLE_METRICS if any(models[n].get(k) is not None for n in names)]
    head = "<tr><th>metric</th>" + "".join(f"<th class='num'>{html.escape(_variant_label(n))}</th>" for n in names)
    rows = [head + "</tr>"]
    for k in keys:
        values = [models[n].get(k) for n in names]
        present = [v for v in values if isinstance(v, (int, float))]
        best = (min(present) if k in LOWER_IS_BETTER else max(present)) if len(present) > 1 else None
        cells = []
        for v in values:
            cls = "num best" if best is not None and v == best and k != "generation_seconds" else "num"
            cells.append(f"<td class='{cls}'>{_cell(k, v)}</td>")
        rows.append(f"<tr><td>{html.escape(LABELS.get(k, k))}</td>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "&ndash;"
    if key in ("exact_match", "accuracy"):
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.2f}" if key in ("chrf", "perplexity", "generation_seconds") else f"{value:.3f}"
    return html.escape(str(value))


def pick_sample(examples: list[dict[str, Any]], k: int = SAMPLE_SIZE) -> list[dict[str, Any]]:
    """A readable sample: examples where base and fine-tuned disagree first, then the rest, in file order."""
    differ = [x for x in examples if len(set(x["answers"].values())) > 1]
    same = [x for x in examples if len(set(x["answers"].values())) <= 1]
    return (differ + same)[:k]


def examples_table(result: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    if not examples or not examples[0].get("answers"):
        return "<p class='note'>No generated answers (no generation metric was asked for).</p>"
    names = list(examples[0]["answers"])
    e = html.escape
    head = "<tr><th style='width:22%'>prompt</th><th>reference</th>" + "".join(
        f"<th>{e(_variant_label(n))}</th>" for n in names) + "</tr>"
    rows = [head]
    for x in pick_sample(examples):
        user = next((m["content"] for m in reversed(x.get("messages", [])) if m.get("role") == "user"), x["prompt"])
        cells = [f"<td><pre>{e(_clip(user))}</pre></td>", f"<td><pre>{e(_clip(x['reference']))}</pre></td>"]
        for n in names:
            scores = x["scores"].get(n, {})
            match = scores.get("exact_match", scores.get("correct"))
            cls = "" if match is None else ("ok" if match else "miss")
            score_text = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            cut = " (cut at max_new_tokens)" if x.get("finish_reason", {}).get(n) == "length" else ""
            cells.append(f"<td class='{cls}'><pre>{e(_clip(x['answers'][n]))}</pre>"
                         f"<div class='score'>{e(score_text + cut)}</div></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    shown = min(len(examples), SAMPLE_SIZE)
    note = (f"<p class='note'>{shown} of {len(examples)} examples, those where the models disagree first. "
            "Every example is in <code>examples.jsonl</code>. Green: exact match; red: not.</p>")
    return note + "<table class='examples'>" + "".join(rows) + "</table>"


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " …"
