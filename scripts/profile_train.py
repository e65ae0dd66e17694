"""Where a training step's time goes: torch.profiler around 12 steps of `finetune train` on bench_train's data.

    python scripts/profile_train.py [MODEL_DIR] [recipe overrides...]     # default: the embedded model

Prints the top operators by self time (CUDA time on a GPU, CPU time otherwise) after a 3-step warm-up run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from scripts import bench_train  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    base = args.pop(0) if args and "=" not in args[0] else None
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        info = bench_train.make_data(128 if cuda else 32, 0, Path(tmp) / "data.json", base)
        data = json.loads((Path(tmp) / "data.json").read_text())
        bench_train.arm_finetune(data, info["model"], Path(tmp) / "warm", args + ["train.max_steps=3"])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        started = time.time()
        with profile(activities=activities) as prof:
            result = bench_train.arm_finetune(data, info["model"], Path(tmp) / "profiled",
                                              args + ["train.max_steps=12" if cuda else "train.max_steps=4"])
        print(f"profiled run: {result} (wall {time.time() - started:.1f} s)")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
