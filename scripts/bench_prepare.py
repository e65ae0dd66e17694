"""Throughput of `finetune prepare` on synthetic chat rows (near-dedupe on), at two sizes.

Writes N synthetic conversations (with 2% exact and 2% near duplicates planted) to a temporary JSON lines
file, runs the real prepare stage on it with the embedded model's tokenizer and chat template, and prints
rows/s for each size plus where the time went. The target: >= 2,000 rows/s on 2 cores, and a cost that
grows linearly with the number of rows (similar rows/s at both sizes).

    python scripts/bench_prepare.py [--sizes 10000 100000] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import yaml


def synthetic_rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ri", "do", "fe", "gu", "ha"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    lines = []
    for i in range(n):
        r = rng.random()
        if lines and r < 0.02:  # exact duplicate of an earlier row
            lines.append(lines[rng.randrange(len(lines))])
            continue
        if lines and r < 0.04:  # near duplicate: an earlier row re-typed in capitals
            row = json.loads(lines[rng.randrange(len(lines))])
            row["messages"][0]["content"] = row["messages"][0]["content"].upper()
            lines.append(json.dumps(row))
            continue
        user = " ".join(rng.choice(vocab) for _ in range(rng.randint(15, 40))) + "?"
        reply = " ".join(rng.choice(vocab) for _ in range(rng.randint(15, 60))) + "."
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: {user}"},
                                              {"role": "assistant", "content": reply}]}))
    return lines


def bench(n: int, model: str, workdir: Path) -> dict:
    from finetune import prepare, recipe

    data = workdir / f"rows-{n}.jsonl"
    data.write_text("".join(line + "\n" for line in synthetic_rows(n)))
    path = workdir / f"bench-{n}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"bench-{n}", "runs_dir": str(workdir / "runs"), "model": {"id": model},
        "data": {"sources": [{"path": data.name}], "clean": {"near_dedupe": True, "max_tokens": 512}},
    }))
    r = recipe.load(path)
    start, cpu_start = time.perf_counter(), time.process_time()
    report = prepare.run(r, force=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    work = sum(report["seconds"].values())  # the per-row steps, without start-up (imports, tokenizer loading)
    return {"rows": n, "seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
            "work_seconds": round(work, 2), "work_rows_per_s": round(n / work), "steps": report["seconds"],
            "steps_cpu_us_per_row": {k: round(v / n * 1e6) for k, v in report["cpu_seconds"].items()},
            # CPU seconds of this process (all threads): what the work costs, even on a machine shared with
            # others, where wall-clock time mostly measures the neighbours
            "cpu_seconds": round(cpu, 2), "rows_per_cpu_s": round(n / cpu),
            "deduped": report["deduped"], "splits": report["splits"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and chat template to use")
    ns = p.parse_args()
    from finetune import models

    models.resolve(ns.model)  # convert/download once, outside the timing
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ns.sizes:
            res = bench(n, ns.model, Path(tmp))
            results.append(res)
            print(f"{n:>8} rows: {res['seconds']:7.1f} s  {res['rows_per_s']:>6} rows/s end to end; "
                  f"{res['work_rows_per_s']:>6} rows/s without start-up; {res['rows_per_cpu_s']:>6} rows per CPU-second; "
                  f"CPU us/row by step {res['steps_cpu_us_per_row']}  "
                  f"deduped {res['deduped']}  splits {res['splits']}", flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"scaling: {b['rows'] / a['rows']:.0f}x rows took {b['seconds'] / a['seconds']:.1f}x time end to end, "
              f"{b['work_seconds'] / a['work_seconds']:.1f}x without start-up, {b['cpu_seconds'] / a['cpu_seconds']:.1f}x "
              f"CPU time (linear = {b['rows'] / a['rows']:.0f}x)")
    import resource

    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
