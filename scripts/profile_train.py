"""Where a training step's time goes on a CUDA GPU: torch.profiler around 12 steps of `finetune train` on the
bench_train data. Usage: python scripts/profile_train.py MODEL_DIR [recipe overrides...]"""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from torch.profiler import ProfilerActivity, profile
from scripts import bench_train as b

base, overrides = sys.argv[1], sys.argv[2:]
with tempfile.TemporaryDirectory() as tmp:
    info = b.make_data(128, 0, Path(tmp) / "d.json", base)
    data = json.loads((Path(tmp) / "d.json").read_text())
    b.arm_finetune(data, info["model"], Path(tmp) / "warm", overrides + ["train.max_steps=3"])  # compile/warm caches
    torch.cuda.synchronize()
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = b.arm_finetune(data, info["model"], Path(tmp) / "prof", overrides + ["train.max_steps=12"])
    torch.cuda.synchronize()
    print("profiled run", r, "wall", round(time.time() - t0, 2))
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
