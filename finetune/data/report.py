"""What prepare did, for people: token length statistics, the terminal summary, the length histogram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def length_stats(lengths: Sequence[int], trained: Sequence[int]) -> dict[str, Any]:
    import numpy as np

    if not lengths:
        return {"rows": 0, "tokens": 0, "trained_tokens": 0}
    arr = np.asarray(lengths)
    p50, p90, p99 = (int(v) for v in np.percentile(arr, [50, 90, 99], method="nearest"))
    return {"rows": len(lengths), "tokens": int(arr.sum()), "trained_tokens": int(sum(trained)),
            "min": int(arr.min()), "p50": p50, "p90": p90, "p99": p99, "max": int(arr.max()),
            "mean": round(float(arr.mean()), 1)}


def plot_lengths(lengths: dict[str, Sequence[int]], path: Path, *, max_tokens: int) -> None:
    """One histogram of token lengths per split, with the max_tokens limit marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    longest = max([max(v) for v in lengths.values() if len(v)] + [1])
    # Zoom on the data; show the max_tokens line only when it is near enough to be readable.
    top = max_tokens if max_tokens <= 1.5 * longest else int(longest * 1.1) + 1
    bins = max(1, min(60, top))
    for split, values in lengths.items():
        if len(values):
            ax.hist(values, bins=bins, range=(0, top), alpha=0.6, label=f"{split} ({len(values)})")
    if max_tokens <= top:
        ax.axvline(max_tokens, color="black", linestyle="--", linewidth=1, label=f"max_tokens {max_tokens}")
    else:
        ax.plot([], [], " ", label=f"max_tokens {max_tokens} (off the chart)")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths after rendering with the chat template")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def print_summary(report: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.text import Text

    from finetune.console import table

    console = Console(highlight=False)
    if report.get("reused"):
        console.print(Text("prepare: inputs unchanged, reusing ", style="green") + Text(str(out_dir)))
    print(table(["step", "rows", "detail"], row_steps(report), title="prepare: rows"))
    print()
    columns = ["split", "rows", "min", "p50", "p90", "p99", "max", "tokens", "trained"]
    keys = ["rows", "min", "p50", "p90", "p99", "max", "tokens", "trained_tokens"]
    print(table(columns, [[split, *(s[k] for k in keys)] for split, s in report["tokens"].items() if s["rows"]],
                title="tokens per example"))
    print()
    for note in report.get("notes", []):
        console.print(Text("note: ", style="yellow") + Text(note), soft_wrap=True)  # one line, searchable in logs
    print(f"outputs: {out_dir}  (report.json, lengths.png, splits/, tokenized/)")


def row_steps(report: dict[str, Any]) -> list[list[Any]]:
    """What happened to the rows, step by step: [step, rows, detail]."""
    rows: list[list[Any]] = [[f"read {src['name']}", src["rows_in"], f"format {src['format']}"]
                             for src in report["sources"]]
    rows.append(["rows in", report["rows_in"], ""])
    for reason, n in report["dropped"].items():
        origins = ", ".join(s["origin"] for s in report["samples"].get(reason, [])[:3])
        rows.append([f"  dropped: {reason}", -n, origins])
    changed = [("truncated to max_tokens", report["truncated"], "kept, cut at the right"),
               ("system prompt added", report["filled"]["system_prompt"], "from data.system_prompt"),
               ("input filled", report["filled"].get("default_input"), "from data.default_input"),
               ("text normalised", report["normalized"], "unicode / whitespace")]
    rows += [[f"  {label}", n, detail] for label, n, detail in changed if n]
    if report.get("numbers_as_text"):
        rows.append(["  numbers read as text", sum(report["numbers_as_text"].values()),
                     ", ".join(f"{k} {v}" for k, v in report["numbers_as_text"].items())])
    if report.get("roles_mapped"):
        rows.append(["  roles mapped", sum(report["roles_mapped"].values()),
                     ", ".join(f"{k} {v}" for k, v in report["roles_mapped"].items())])
    rows += [[split, report["splits"][split], ""] for split in ("train", "validation", "test")]
    return rows
