"""Decode speed of an exported GGUF (llama.cpp) vs transformers generate() on the same prompt, in one run.

    python scripts/bench_export.py                       # runs/quickstart/export: Q8_0 GGUF vs merged/
    python scripts/bench_export.py --export runs/NAME/export --quant Q4_K_M --tokens 128

Both decode the same number of new tokens greedily from the same chat prompt, with the end-of-turn token
suppressed so neither stops early. Prompt processing is timed separately and left out of tokens/s. llama.cpp
runs in a child process (a native crash must not hide the transformers number). Prints one JSON line per
runtime and the ratio; the issue's target is >= 3 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def bench_llama(gguf: str, prompt_ids: list[int], tokens: int, suppress: list[int], threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(gguf, n_ctx=len(prompt_ids) + tokens + 16, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    bias = {t: -1e9 for t in suppress}

    def run(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, repeat_penalty=1.0, logit_bias=bias)
        assert out["usage"]["completion_tokens"] == n, out["usage"]
        return time.perf_counter() - t0

    prefill = min(run(1) for _ in range(2))  # prompt processing + one token
    total = run(tokens)
    return {"runtime": "llama.cpp", "model": gguf, "tokens": tokens, "seconds": round(total - prefill, 3),
            "tokens_per_s": round((tokens - 1) / (total - prefill), 2)}


def bench_hf(model_dir: str, prompt_ids: list[int], tokens: int, suppress: list[int], threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    ids = torch.tensor([prompt_ids])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, suppress_tokens=suppress)
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - t0

    prefill = min(run(1) for _ in range(2))
    total = run(tokens)
    return {"runtime": "transformers", "model": model_dir, "dtype": "float32", "tokens": tokens,
            "seconds": round(total - prefill, 3), "tokens_per_s": round((tokens - 1) / (total - prefill), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default="runs/quickstart/export", help="an export folder (run `finetune export` first)")
    p.add_argument("--quant", default="Q8_0", help="which GGUF of the export to time")
    p.add_argument("--tokens", type=int, default=128, help="new tokens to decode")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both runtimes")
    p.add_argument("--child", help=argparse.SUPPRESS)
    ns = p.parse_args()
    # Both runtimes use OpenMP; spinning waits make either one many times slower on a busy machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if ns.child:  # the llama.cpp half, in its own process
        args = json.loads(ns.child)
        print(json.dumps(bench_llama(**args)))
        return 0

    from transformers import AutoTokenizer

    export = Path(ns.export)
    manifest = json.loads((export / "manifest.json").read_text()) if (export / "manifest.json").exists() else None
    if manifest is None:
        sys.exit(f"{export}/manifest.json not found: run `finetune export RECIPE` first, or pass --export")
    gguf = manifest["outputs"]["gguf"].get(ns.quant)
    if gguf is None:
        sys.exit(f"the export has no {ns.quant} GGUF (it has {', '.join(manifest['outputs']['gguf'])})")
    merged = manifest["outputs"]["merged"]
    tok = AutoTokenizer.from_pretrained(merged)
    prompt_ids = list(tok.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    suppress = sorted({tok.eos_token_id, *([tok.pad_token_id] if tok.pad_token_id is not None else [])})
    child = json.dumps({"gguf": gguf, "prompt_ids": prompt_ids, "tokens": ns.tokens, "suppress": suppress,
                        "threads": ns.threads})
    proc = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llama.cpp benchmark failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    llama = json.loads(proc.stdout.strip().splitlines()[-1])
    hf = bench_hf(merged, prompt_ids, ns.tokens, suppress, ns.threads)
    print(json.dumps(llama))
    print(json.dumps(hf))
    ratio = llama["tokens_per_s"] / hf["tokens_per_s"]
    print(json.dumps({"ratio": round(ratio, 2), "quant": ns.quant, "threads": ns.threads, "target": 3.0,
                      "meets_target": ratio >= 3.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
