"""Memory held by a prepared run's tokenized splits as train and eval read them: numpy views into the Arrow buffers
(finetune.data.tokenized, what finetune does) against Python lists of ints (what it did before), measured with
tracemalloc in the same process. Prints MiB per split and the ratio.

    finetune prepare recipes/quickstart.yaml && python scripts/bench_token_memory.py recipes/quickstart.yaml
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def held_bytes(build) -> tuple[int, object]:
    """Bytes still allocated after ``build()`` returns (what the result keeps alive): Python and numpy heap via
    tracemalloc, plus Arrow's own allocations (a column in several chunks is copied into one). The memory-mapped
    split files themselves are page cache, counted by neither."""
    import pyarrow as pa

    gc.collect()
    tracemalloc.start()
    before, arrow_before = tracemalloc.get_traced_memory()[0], pa.total_allocated_bytes()
    result = build()
    gc.collect()
    after, arrow_after = tracemalloc.get_traced_memory()[0], pa.total_allocated_bytes()
    tracemalloc.stop()
    return after - before + arrow_after - arrow_before, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args()
    from finetune import recipe as recipe_mod
    from finetune.data import tokenized
    from finetune.run import artifacts

    recipe = recipe_mod.load(ns.recipe, ns.overrides)
    prepared = artifacts.load(recipe, artifacts.Prepared, ns.recipe)
    total_lists = total_arrays = 0
    print(f"{'split':<12}{'examples':>9}{'tokens':>10}{'lists MiB':>11}{'arrays MiB':>12}{'ratio':>8}")
    for split, path in prepared.tokenized.items():
        if not path.exists():
            continue
        ds = tokenized.load(path)
        lists, rows = held_bytes(lambda ds=ds: [(list(i), list(lab)) for i, lab in zip(ds["input_ids"], ds["labels"],
                                                                                        strict=True)])
        arrays, views = held_bytes(lambda ds=ds: tokenized.rows(ds))
        n_tokens = sum(len(i) for i, _ in rows)
        assert all(list(a) == b[0] for a, b in zip((v[0] for v in views), rows, strict=True))  # the same tokens
        total_lists, total_arrays = total_lists + lists, total_arrays + arrays
        print(f"{split:<12}{len(rows):>9}{n_tokens:>10}{lists / 2**20:>11.2f}{arrays / 2**20:>12.2f}"
              f"{lists / max(arrays, 1):>7.1f}x")
        del rows, views
    print(f"{'all':<12}{'':>9}{'':>10}{total_lists / 2**20:>11.2f}{total_arrays / 2**20:>12.2f}"
          f"{total_lists / max(total_arrays, 1):>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
