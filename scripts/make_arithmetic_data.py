"""Write recipes/data/arithmetic.jsonl: the GRPO example's task (recipes/grpo.yaml), made deterministically.

Each row asks for a sum or a difference of two numbers below 50, the system prompt asking for the result only; the
completion is the reference answer the rewards check (numeric_match, and exact_match in eval).
Run: python scripts/make_arithmetic_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "recipes" / "data" / "arithmetic.jsonl"
SYSTEM = "You are a calculator. Reply with only the result."


def rows(n: int = 400, seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        if rng.random() < 0.5:
            question, answer = f"Compute {a} + {b}.", a + b
        else:
            a, b = max(a, b), min(a, b)
            question, answer = f"Compute {a} - {b}.", a - b
        out.append({"system": SYSTEM, "prompt": question, "completion": str(answer)})
    return out


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {OUT}")
