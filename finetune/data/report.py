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
    from rich.table import Table

    console = Console()
    if report.get("reused"):
        console.print(f"[green]prepare: inputs unchanged, reusing[/green] {out_dir}")
    rows = Table(title="prepare: rows", show_header=True, header_style="bold")
    rows.add_column("step")
    rows.add_column("rows", justify="right")
    rows.add_column("detail")
    for src in report["sources"]:
        rows.add_row(f"read {src['name']}", str(src["rows_in"]), f"format {src['format']}")
    rows.add_row("rows in", str(report["rows_in"]), "")
    for reason, n in report["dropped"].items():
        origins = ", ".join(s["origin"] for s in report["samples"].get(reason, [])[:3])
        rows.add_row(f"  dropped: {reason}", f"-{n}", origins)
    if report["truncated"]:
        rows.add_row("  truncated to max_tokens", str(report["truncated"]), "kept, cut at the right")
    if report["filled"]["system_prompt"]:
        rows.add_row("  system prompt added", str(report["filled"]["system_prompt"]), "from data.system_prompt")
    if report["filled"].get("default_input"):
        rows.add_row("  input filled", str(report["filled"]["default_input"]), "from data.default_input")
    if report["normalized"]:
        rows.add_row("  text normalised", str(report["normalized"]), "unicode / whitespace")
    if report.get("roles_mapped"):
        rows.add_row("  roles mapped", str(sum(report["roles_mapped"].values())),
                     ", ".join(f"{k} {v}" for k, v in report["roles_mapped"].items()))
    for split in ("train", "validation", "test"):
        rows.add_row(f"{split}", str(report["splits"][split]), "")
    console.print(rows)

    lengths = Table(title="tokens per example", show_header=True, header_style="bold")
    for col in ("split", "rows", "min", "p50", "p90", "p99", "max", "tokens", "trained"):
        lengths.add_column(col, justify="right" if col != "split" else "left")
    for split, s in report["tokens"].items():
        if s["rows"]:
            lengths.add_row(split, str(s["rows"]), str(s["min"]), str(s["p50"]), str(s["p90"]), str(s["p99"]),
                            str(s["max"]), str(s["tokens"]), str(s["trained_tokens"]))
    console.print(lengths)
    from rich.text import Text

    for note in report.get("notes", []):
        console.print(Text("note: ", style="yellow") + Text(note))
    console.print(f"outputs: {out_dir}  (report.json, lengths.png, splits/, tokenized/)")
