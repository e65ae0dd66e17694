"""Decode speed of an exported GGUF (llama.cpp) vs transformers generate() on the same prompt, each at its best.

    python scripts/bench_export.py                        # runs/quickstart/export: Q8_0 GGUF vs merged/
    python scripts/bench_export.py --export runs/NAME/export --quant Q4_K_M --tokens 128
    python scripts/bench_export.py --gguf M.gguf --model HF_DIR          # any pair
    python scripts/bench_export.py --busy 2                               # also with 2 busy processes beside

Both runtimes decode the same number of new tokens greedily from the same chat prompt, with the end-of-turn token
suppressed so neither stops early; prompt processing is timed separately and left out of tokens/s. Each arm runs
in its own child process, under each OpenMP wait policy (unset: the library default of spinning a while then
sleeping; ACTIVE: spin; PASSIVE: sleep at once), on an idle machine and, with ``--busy N``, with N processes
spinning beside it (a user's machine running something else). Each runtime's best setting is printed, and the ratio
of the two bests. transformers runs in float32 and, where the CPU computes bf16 fast, in bfloat16.

With an export folder it also times what `finetune eval` does on the test split: the GGUF column (``runtime.chat``,
one child process, prompts one after another) vs the transformers column (``eval_models.generate``, batched) on the
same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
POLICIES = ["unset", "ACTIVE", "PASSIVE"]


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
    total = min(run(tokens) for _ in range(2))
    return {"seconds": round(total - prefill, 3), "tokens_per_s": round((tokens - 1) / (total - prefill), 2),
            "prefill_s": round(prefill, 4)}


def bench_hf(model_dir: str, prompt_ids: list[int], tokens: int, suppress: list[int], threads: int,
             dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True).eval()
    ids = torch.tensor([prompt_ids])

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, suppress_tokens=suppress)
        assert out.shape[1] - ids.shape[1] == n
        return time.perf_counter() - t0

    prefill = min(run(1) for _ in range(2))
    total = min(run(tokens) for _ in range(2))
    return {"seconds": round(total - prefill, 3), "tokens_per_s": round((tokens - 1) / (total - prefill), 2)}


def eval_columns(export: Path, exported, quant: str, n: int) -> dict:
    """The eval stage's two generation columns on the same test prompts, as `finetune eval` runs them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import eval_models
    from finetune.data.render import prompt_text
    from finetune.run import artifacts
    split = artifacts.from_folder(artifacts.Prepared, Path(export).parent / "prepare").splits["test"]
    rows = [json.loads(x) for x in split.read_text().splitlines() if x.strip()][:n] if split.exists() else []
    rows = [r for r in rows if r.get("messages") and r["messages"][-1]["role"] == "assistant"]
    if not rows:
        return {}
    merged = exported.merged
    tok = AutoTokenizer.from_pretrained(merged)
    prompts = [prompt_text(tok, r["messages"][:-1]) for r in rows]
    max_new = 64
    n_ctx = max(2048, max_new + max(len(json.dumps(r)) for r in rows) + 256)
    gguf_s = {}
    for processes in sorted({1, 2, os.cpu_count() or 1}):
        t0 = time.perf_counter()
        eval_models.gguf_generate(exported.gguf[quant], rows, reasoning="auto", max_new_tokens=max_new,
                                  temperature=0.0, n_ctx=n_ctx, seed=0, processes=processes)
        gguf_s[processes] = round(time.perf_counter() - t0, 1)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    t0 = time.perf_counter()
    eval_models.generate(model, tok, prompts, device="cpu", max_new_tokens=max_new, temperature=0.0, batch_size=16,
                         seed=0)
    hf_s = time.perf_counter() - t0
    best = min(gguf_s, key=gguf_s.get)
    return {"prompts": len(rows), "gguf_column_s": gguf_s[best], "gguf_processes": best,
            "gguf_column_s_by_processes": gguf_s, "transformers_column_s": round(hf_s, 1),
            "ratio": round(hf_s / gguf_s[best], 2)}


def child_main(spec: dict) -> None:
    if spec["runtime"] == "llama.cpp":
        result = bench_llama(spec["gguf"], spec["prompt_ids"], spec["tokens"], spec["suppress"], spec["threads"])
    else:
        result = bench_hf(spec["model"], spec["prompt_ids"], spec["tokens"], spec["suppress"], spec["threads"],
                          spec["dtype"])
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict, policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join([*([spec["pythonpath"]] if spec.get("pythonpath") else []), str(REPO)])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{spec['runtime']} ({policy}) failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default="runs/quickstart/export", help="an export folder (run `finetune export` first)")
    p.add_argument("--quant", default="Q8_0", help="which GGUF of the export to time")
    p.add_argument("--gguf", help="a GGUF file (with --model: instead of --export)")
    p.add_argument("--model", help="the Hugging Face folder the GGUF was made from")
    p.add_argument("--tokens", type=int, default=128, help="new tokens to decode")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both runtimes")
    p.add_argument("--busy", type=int, default=0, help="also measure with this many spinning processes beside")
    p.add_argument("--eval-prompts", type=int, default=50, help="test prompts for the eval-column comparison")
    p.add_argument("--llama-cpp-build", metavar="DIR",
                   help="also time another llama-cpp-python build, installed with `pip install --no-deps --target DIR "
                        "WHEEL` (for example one compiled with other SIMD flags)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        child_main(json.loads(ns.child))
        return 0

    from transformers import AutoTokenizer

    from finetune import hardware
    from finetune.run import artifacts

    exported = None
    if ns.gguf:
        if not ns.model:
            sys.exit("--gguf needs --model (the Hugging Face folder it was made from)")
        gguf, merged = ns.gguf, ns.model
    else:
        export = Path(ns.export)
        exported = artifacts.from_folder(artifacts.Exported, export)
        if ns.quant not in exported.gguf:
            sys.exit(f"the export has no {ns.quant} GGUF (it has {', '.join(exported.gguf)})")
        gguf, merged = str(exported.gguf[ns.quant]), str(exported.merged)
    tok = AutoTokenizer.from_pretrained(merged)
    prompt_ids = list(tok.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])
    suppress = sorted({tok.eos_token_id, *([tok.pad_token_id] if tok.pad_token_id is not None else [])})
    common = {"prompt_ids": prompt_ids, "tokens": ns.tokens, "suppress": suppress, "threads": ns.threads}
    arms = {"llama.cpp": {"runtime": "llama.cpp", "gguf": gguf, **common},
            "transformers fp32": {"runtime": "transformers", "model": merged, "dtype": "float32", **common}}
    if ns.llama_cpp_build:
        arms[f"llama.cpp ({Path(ns.llama_cpp_build).name})"] = {**arms["llama.cpp"], "pythonpath": ns.llama_cpp_build}
    if hardware.cpu_has_fast_bf16():
        arms["transformers bf16"] = {"runtime": "transformers", "model": merged, "dtype": "bfloat16", **common}
    conditions = ["idle"] + ([f"busy x{ns.busy}"] if ns.busy else [])
    print(f"{Path(gguf).name} vs {merged}: {ns.tokens} new tokens, {ns.threads} threads, {os.cpu_count()} cores")
    results: dict[tuple[str, str, str], float] = {}
    for condition in conditions:
        procs = spinners(ns.busy) if condition != "idle" else []
        try:
            for arm, spec in arms.items():
                for policy in POLICIES:
                    r = run_child(spec, policy)
                    results[(condition, arm, policy)] = r["tokens_per_s"]
                    prefill = f"  (prompt of {len(prompt_ids)} tokens + 1: {r['prefill_s']:.3f} s)" \
                        if "prefill_s" in r else ""
                    print(f"  {condition:9s} {arm:24s} OMP_WAIT_POLICY={policy:8s} {r['tokens_per_s']:7.1f} tok/s"
                          + prefill, flush=True)
        finally:
            for proc in procs:
                proc.kill()
    summary = {}
    for condition in conditions:
        best = {}
        for runtime in ("llama.cpp", "transformers"):
            cands = {(a, pol): v for (c, a, pol), v in results.items() if c == condition and a.startswith(runtime)}
            (arm, policy), value = max(cands.items(), key=lambda kv: kv[1])
            best[runtime] = {"arm": arm, "policy": policy, "tokens_per_s": value}
        ratio = best["llama.cpp"]["tokens_per_s"] / best["transformers"]["tokens_per_s"]
        summary[condition] = {**best, "ratio": round(ratio, 2)}
        print(f"{condition}: best llama.cpp {best['llama.cpp']['tokens_per_s']:.1f} tok/s "
              f"(OMP_WAIT_POLICY={best['llama.cpp']['policy']}), best transformers "
              f"{best['transformers']['tokens_per_s']:.1f} tok/s ({best['transformers']['arm']}, "
              f"OMP_WAIT_POLICY={best['transformers']['policy']}): ratio {ratio:.2f}")
    if exported is not None:
        cols = eval_columns(Path(ns.export), exported, ns.quant, ns.eval_prompts)
        if cols:
            by = ", ".join(f"{k} process{'es' if k > 1 else ''} {v} s" for k, v in cols["gguf_column_s_by_processes"].items())
            print(f"eval GGUF column ({by})")
            print(f"eval columns on {cols['prompts']} test prompts: GGUF {cols['gguf_column_s']} s "
                  f"({cols['gguf_processes']} processes), transformers "
                  f"(batched) {cols['transformers_column_s']} s: GGUF column speed ratio {cols['ratio']:.2f} "
                  "(target >= 1.0)")
            summary["eval_columns"] = cols
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
