"""Check the planner against measured peak memory: real peft LoRA steps on the embedded model, on this CPU.

Each configuration runs in a fresh child process (so peaks do not mix): it imports the libraries, loads the
embedded SmolLM2-135M-Instruct in the dtype `finetune plan` assumes for this CPU, wraps it in peft LoRA
(all-linear, the recipe's r), and takes a few AdamW steps on full-length random sequences (the planner's
worst case: every sequence at max_tokens), with the loss transformers computes from labels. The peak is the
process's maximum resident set size (ru_maxrss), the same figure a CPU training summary reports.

    .venv/bin/python scripts/check_plan_memory.py                 # the default grid
    .venv/bin/python scripts/check_plan_memory.py --grid 8x128 16x256 16x256c   # c = gradient checkpointing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(batch: int, seq: int, ckpt: bool, r: int, steps: int) -> dict:
    import resource
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune import hardware, models

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resolved = models.resolve(models.EMBEDDED_MODEL)
    dtype = hardware.torch_dtype("auto", "cpu")
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, use_safetensors=True)
    model.config.use_cache = False
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return {"batch": batch, "seq": seq, "checkpointing": ckpt, "dtype": str(dtype).removeprefix("torch."),
            "import_rss": base_rss, "loaded_rss": loaded_rss,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds_per_step": (time.time() - t0) / steps, "losses": losses}


def planned(batch: int, seq: int, ckpt: bool, r: int, dtype: str) -> int:
    from finetune import models, plan

    config, _ = plan.load_model_config(models.EMBEDDED_MODEL)
    dims = plan.ModelDims.from_config(config)
    s = plan.Settings(method="lora", lora_r=r, batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt,
                      weight_dtype=dtype, device="cpu")
    return plan.estimate(dims, s).total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="*", default=["8x128", "16x256", "4x512", "16x256c"],
                    help="BATCHxSEQ[c] configurations (c: gradient checkpointing)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        b, s, c = json.loads(ns.child)
        print(json.dumps(child(b, s, c, ns.r, ns.steps)))
        return 0
    rows = []
    for item in ns.grid:
        ckpt = item.endswith("c")
        b, s = (int(x) for x in item.rstrip("c").split("x"))
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([b, s, ckpt]), "--r", str(ns.r),
                               "--steps", str(ns.steps)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        est = planned(b, s, ckpt, ns.r, m["dtype"])
        m["estimate"] = est
        m["error"] = (est - m["peak_rss"]) / m["peak_rss"]
        rows.append(m)
        mb = 1024**2
        print(f"{b:>3} x {s:<4} ckpt={'on ' if ckpt else 'off'} {m['dtype']:<8} imports {m['import_rss'] / mb:6.0f} MB  "
              f"loaded {m['loaded_rss'] / mb:6.0f} MB  peak {m['peak_rss'] / mb:6.0f} MB  estimate {est / mb:6.0f} MB  "
              f"error {m['error']:+.1%}  ({m['seconds_per_step']:.1f} s/step)", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
