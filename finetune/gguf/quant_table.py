"""The quantization table: what each exported GGUF type costs and keeps, and which one to ship.

For each type: file size, teacher-forced perplexity, KL divergence and top-1 agreement against the fine-tuned model
(from the parity checks), exact match on held-out prompts answered greedily by that GGUF through its own chat
template, and decode speed. ``pick`` chooses the smallest file that fits a memory budget and keeps exact match
within a tolerance of the unquantized GGUF (which parity has shown to answer like the fine-tuned model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.console import mib
from finetune.gguf import runtime

UNQUANTIZED = ("F32", "F16", "BF16")


def task_prompts(rows: list[dict], limit: int) -> list[tuple[list[dict], str]]:
    """(conversation up to its last answer, that answer) for held-out rows in chat form."""
    out = []
    for row in rows:
        msgs = row.get("messages") or []
        if len(msgs) < 2 or msgs[-1].get("role") != "assistant" or not any(m.get("role") == "user" for m in msgs):
            continue
        out.append((msgs[:-1], str(msgs[-1].get("content") or "")))
        if len(out) >= limit:
            break
    return out


def build(ggufs: dict[str, Path], *, parity_types: dict[str, Any] | None, prompts: list[tuple[list[dict], str]],
          max_tokens: int, imatrix_types: set[str], threads: int | None = None, log=print) -> list[dict]:
    """One row per GGUF type, in the order given."""
    from finetune.metrics import normalize

    rows = []
    for qtype, path in ggufs.items():
        row: dict[str, Any] = {"type": qtype, "file": Path(path).name, "bytes": Path(path).stat().st_size,
                               "imatrix": qtype in imatrix_types}
        logits = ((parity_types or {}).get(qtype) or {}).get("logits") or {}
        for key in ("top1_agreement", "kl_mean", "ppl_reference", "ppl_gguf"):
            row[key] = logits.get(key)
        if prompts:
            log(f"export: scoring {qtype} on {len(prompts)} held-out prompts")
            answers = runtime.chat(path, [c for c, _ in prompts], max_tokens=max_tokens, threads=threads)
            hits = [normalize(a["text"]) == normalize(ref) for a, (_, ref) in zip(answers, prompts, strict=True)]
            row["exact_match"] = sum(hits) / len(hits)
            row["examples"] = len(hits)
            tokens, seconds = sum(a["tokens"] for a in answers), sum(a.get("seconds", 0.0) for a in answers)
            row["decode_tokens_per_s"] = tokens / seconds if seconds > 0 else None
        rows.append(row)
    return rows


def pick(rows: list[dict], *, fit_bytes: int | None, tolerance: float) -> tuple[str | None, str]:
    """The smallest type within the budget whose exact match is at most ``tolerance`` below the unquantized one's.
    Returns (type or None, why)."""
    reference = next((r for r in rows if r["type"] in UNQUANTIZED and r.get("exact_match") is not None), None)
    candidates = [r for r in rows if fit_bytes is None or r["bytes"] <= fit_bytes]
    if not candidates:
        smallest = min(rows, key=lambda r: r["bytes"])
        return None, (f"no exported type fits {fit_bytes / 1e9:.2f} GB (smallest: {smallest['type']}, "
                      f"{smallest['bytes'] / 1e9:.2f} GB); export a smaller type or raise export.fit_gb")
    if reference is not None:
        good = [r for r in candidates if r.get("exact_match") is not None
                and r["exact_match"] >= reference["exact_match"] - tolerance]
        if not good:
            return None, (f"no type within the budget keeps exact match within {tolerance:.2f} of {reference['type']} "
                          f"({reference['exact_match']:.2f}); raise export.fit_gb or export.metric_tolerance")
        best = min(good, key=lambda r: r["bytes"])
        return best["type"], (f"smallest type within {fit_bytes / 1e9:.2f} GB" if fit_bytes else "smallest type") + (
            f" whose exact match ({best['exact_match']:.2f}) is within {tolerance:.2f} of "
            f"{reference['type']} ({reference['exact_match']:.2f})")
    best = min(candidates, key=lambda r: r["bytes"])
    return best["type"], "smallest type within the budget (no held-out prompts to compare answers)"


def format_measure(value: Any, fmt: str) -> str | None:
    """A measure in the table (agreement, KL, perplexity, speed) formatted with ``fmt``; None when it was not
    measured (missing, or not a number)."""
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def markdown(rows: list[dict]) -> str:
    def f(value: Any, fmt: str) -> str:
        return format_measure(value, fmt) or "-"

    lines = ["| type | imatrix | size | top-1 vs fine-tuned | KL | perplexity | exact match | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        em = f"{r['exact_match']:.2f} (n={r['examples']})" if r.get("exact_match") is not None else "-"
        lines.append(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {mib(r['bytes'])} | "
                     f"{f(r.get('top1_agreement'), '.3f')} | {f(r.get('kl_mean'), '.4f')} | "
                     f"{f(r.get('ppl_gguf'), '.2f')} | {em} | {f(r.get('decode_tokens_per_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_file: Path) -> Path | None:
    """Size against quality, one point per type and measure: exact match on the held-out prompts and top-1
    agreement with the fine-tuned model (where exact match ties, agreement still tells the types apart)."""
    series = [(label, key, marker) for label, key, marker in
              (("exact match", "exact_match", "o"), ("top-1 agreement with the fine-tuned model", "top1_agreement", "s"))
              if any(r.get(key) is not None for r in rows)]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, key, marker in series:
        points = [(r["bytes"] / 2**20, r[key], r["type"]) for r in rows if r.get(key) is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("fraction (higher is better)")
    ax.set_title("GGUF types: size vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return out_file
