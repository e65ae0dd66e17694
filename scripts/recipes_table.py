"""Print the README's table of shipped recipes: model, size, method, card, planned peak memory, time per 1k examples.

Every number comes from `finetune plan` on the model's config.json snapshot in tests/fixtures/configs/ (no
download); times are estimates at the planner's assumed mid-range GPU throughput, labelled as such.

    .venv/bin/python scripts/recipes_table.py            # markdown to stdout
    .venv/bin/python scripts/recipes_table.py --json     # the same rows as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune import plan, recipe  # noqa: E402


def rows() -> list[dict]:
    out = []
    for path in recipe.recipe_files(REPO / "recipes"):
        # the recipe's own worst case, not numbers from a local prepare run
        r = recipe.load(path, [f"runs_dir={tempfile.gettempdir()}/finetune-recipes-table-no-runs"])
        fixture = REPO / "tests" / "fixtures" / "configs" / f"{r.model.id.replace('/', '--')}.json"
        card = r.card_gb
        result = plan.run(r, gpu_gb=card if card else 8, config_path=fixture if fixture.exists() else None)
        target = result["results"][0]
        s, e = target["settings"], target["estimate"]
        out.append({
            "recipe": path.relative_to(REPO).as_posix(),
            "model": r.model.id,
            "params_b": round(result["total_params"] / 1e9, 2),
            "method": s["method"],
            "card_gb": card,
            "gated": r.model.gated,
            "seq_x_batch": f"{s['seq_len']} x {s['batch_size']}",
            "checkpointing": s["gradient_checkpointing"],
            "peak_gib": round(e["total"] / plan.GiB, 1),
            "fits": target["fits"],
            "minutes_per_1k": round(result["time_estimate"]["seconds_per_1k_examples"] / 60, 2),
            "tokens_per_example": round(result["time_estimate"]["tokens_per_example"]),
        })
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        "| Recipe | Model | Params | Method | Card | Seq x micro-batch | Planned peak | Est. min / 1k examples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        card = f"{t['card_gb']} GB" if t["card_gb"] else "CPU (8 GB plan)"
        model = t["model"] + (" (gated)" if t["gated"] else "")
        params = f"{t['params_b']:.2f}B" if t["params_b"] < 1 else f"{t['params_b']:.1f}B"
        minutes = f"~{t['minutes_per_1k']:.1f}" if t["minutes_per_1k"] >= 0.1 else "< 0.1"
        lines.append(f"| `{t['recipe']}` | {model} | {params} | {t['method']} | {card} | {t['seq_x_batch']}"
                     f"{' (ckpt)' if t['checkpointing'] else ''} | {t['peak_gib']} GiB | {minutes} |")
    lines.append("")
    lines.append(f"Planned peak and times are estimates from `finetune plan` (times: a mid-range GPU sustaining "
                 f"{plan.MID_RANGE_GPU_FLOPS / 1e12:.0f} TFLOP/s of bf16 training, examples of half the recipe's "
                 "max_tokens; not measurements). (ckpt): gradient checkpointing on. Regenerate with "
                 "`python scripts/recipes_table.py`.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    table = rows()
    print(json.dumps(table, indent=2) if ns.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
