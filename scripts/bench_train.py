"""Training speed: vanilla transformers Trainer + peft LoRA vs `finetune train`, same model, data and settings.

    .venv/bin/python scripts/bench_train.py                 # embedded SmolLM2-135M, 64 conversations
    .venv/bin/python scripts/bench_train.py --examples 32 --rounds 2
    python scripts/bench_train.py --base DIR --examples 256    # any local model folder (a GPU: scripts/gpu_check.sh)
    python scripts/bench_train.py --variant no-liger="train.kernels=none" --variant padded="train.packing=false"
    .venv/bin/python scripts/bench_train.py --large-vocab      # the loss on a 262k vocabulary: full vs chunked logits

Both arms train the same LoRA (r=16, alpha=32, all linear layers, AdamW, lr 2e-4, linear schedule, no warmup,
batch 8, one epoch, assistant-only loss) on the same variable-length chat data (1-6 support tickets per
conversation from recipes/data/quickstart.jsonl, rendered once with the model's chat template). Each arm runs in
a fresh child process so that its peak RSS is its own. tokens/s counts real (unpadded) tokens over the training
loop's wall time (Trainer: ``train_runtime``; finetune: ``summary['seconds']``), model loading excluded.

- vanilla: ``Trainer`` defaults (fp32 weights, ``DataCollatorForSeq2Seq`` dynamic padding, random batches).
- finetune: ``finetune.train.run`` defaults (bf16 base weights where the CPU has bf16, padding-free packed
  batches grouped by length, logits only on trained positions, threads = cores).

With CUDA both arms train on the GPU (the Trainer's default fp32 there too; finetune's bf16 base weights, packed
rows, and Liger kernels when installed); peak memory is then the GPU's (``torch.cuda.max_memory_allocated``).

``--large-vocab``: the training loss on a big vocabulary, alone. A random Gemma-3-270M-shaped model (262,144-token
vocabulary, width 640, tied embeddings; ``--lv-layers`` decoder layers; fp32 on a CPU, bf16 under autocast on
CUDA) with LoRA (r=16, all linear layers) and finetune's packed attention trains ``--lv-steps`` steps on packed micro-batches of ``--lv-batch`` random sequences of ``--lv-seq`` tokens
(the first tenth of each a prompt, not trained): once with the full logits (``forward_loss_sum(chunked=False)``,
the loss before training/loss.py) and once chunked, each arm in its own process, the same weights and batches.
Prints tokens/s (after one warm-up step), the peak memory of the training steps (peak RSS above the RSS of the
loaded model, Linux's VmHWM reset after loading; on CUDA ``max_memory_allocated`` above the allocated model), the ratios, and the first losses of both (equal to ~1e-6).

On a shared machine speeds are noisy: ``--rounds 2`` alternates the arms and keeps each arm's best round.

Speed only counts at equal quality: after its epoch, each arm's trained LoRA is scored by the same function on the
same held-out conversations (``--heldout``, drawn with another seed): mean cross-entropy per assistant token, base
weights in fp32, padded batches, eval mode. The ratio is printed beside that comparison. (The logged training
losses are not comparable: the Trainer logs each step's mean, finetune a window's mean per trained token.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HYPER = {"r": 16, "alpha": 32, "lr": 2e-4, "batch_size": 8}


def make_data(n: int, seed: int, out: Path, base: str | None = None, heldout: int = 16) -> dict:
    """n conversations of 1-6 tickets each (variable length), rendered with assistant-only labels, plus
    ``heldout`` more drawn with another seed for the equal-quality check."""
    from finetune import models
    from finetune.data.render import render_messages

    resolved = models.resolve(base or models.EMBEDDED_MODEL)
    tokenizer = models.load_tokenizer(resolved.path)
    rows = []
    for line in (REPO / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines():
        try:  # the quickstart file has planted defects (for prepare to catch): keep the clean conversations
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
                and messages[-1].get("role") == "assistant" and all(m.get("content") for m in messages)):
            rows.append(row)

    def draw(count: int, rng: random.Random) -> tuple[list, list]:
        ids, labels = [], []
        for _ in range(count):
            picked = rng.sample(rows, rng.randint(1, 6))
            messages = [picked[0]["messages"][0]] if picked[0]["messages"][0]["role"] == "system" else []
            for r in picked:
                messages += [m for m in r["messages"] if m["role"] != "system"]
            i, lab = render_messages(tokenizer, messages, train_on="assistant")
            ids.append(i)
            labels.append(lab)
        return ids, labels

    ids, labels = draw(n, random.Random(seed))
    held_ids, held_labels = draw(heldout, random.Random(seed + 10_000))
    data = {"input_ids": ids, "labels": labels, "length": [len(x) for x in ids],
            "heldout": {"input_ids": held_ids, "labels": held_labels}}
    out.write_text(json.dumps(data))
    lengths = data["length"]
    return {"examples": n, "tokens": sum(lengths), "min_len": min(lengths), "max_len": max(lengths),
            "mean_len": round(sum(lengths) / n, 1), "model": str(resolved.path)}


# ------------------------------------------------------------------------------------------------ quality
def heldout_loss(model, heldout: dict, pad_id: int) -> float:
    """Mean cross-entropy per assistant token on the held-out conversations: one function for both arms."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    rows = list(zip(heldout["input_ids"], heldout["labels"], strict=True))
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = rows[i:i + 8]
            width = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in batch], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def _fp32_with_adapter(model_path: str, adapter_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if torch.cuda.is_available():
        base = base.to("cuda")
    return PeftModel.from_pretrained(base, adapter_dir)


# ------------------------------------------------------------------------------------------------ arms
def arm_vanilla(data: dict, model_path: str, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    ds = Dataset.from_dict({"input_ids": data["input_ids"], "labels": data["labels"]})
    args = TrainingArguments(output_dir=str(work / "vanilla"), per_device_train_batch_size=HYPER["batch_size"],
                             num_train_epochs=1, learning_rate=HYPER["lr"], lr_scheduler_type="linear",
                             save_strategy="no", report_to=[], logging_steps=1,
                             use_cpu=not torch.cuda.is_available(), seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's peak, before the quality check
    trainer.model.save_pretrained(work / "vanilla-adapter")
    quality = heldout_loss(_fp32_with_adapter(model_path, work / "vanilla-adapter"), data["heldout"],
                           tokenizer.pad_token_id)
    return {"seconds": out.metrics["train_runtime"], "steps": trainer.state.global_step, "loss_first": losses[:1],
            "loss_last": losses[-1:], "peak_rss_mb": peak, "heldout_loss": quality}


def arm_finetune(data: dict, model_path: str, work: Path, overrides: list[str] | None = None) -> dict:
    from datasets import Dataset

    from finetune import recipe as recipe_mod
    from finetune import train
    from finetune.run import artifacts, runs

    recipe = recipe_mod.validate_dict(recipe_mod.apply_overrides({
        "name": "bench", "runs_dir": str(work / "runs"), "seed": 42, "model": {"id": model_path},
        "train": {"method": "lora", "lora": {"r": HYPER["r"], "alpha": HYPER["alpha"]}, "lr": HYPER["lr"],
                  "epochs": 1, "batch_size": HYPER["batch_size"], "scheduler": "linear", "warmup_ratio": 0.0,
                  "save_every": 10**6, "eval_every": 10**6, "log_every": 4},
    }, overrides or []), base_dir=REPO)
    tokenized = recipe.run_dir("prepare") / "tokenized" / "train"
    Dataset.from_dict({k: data[k] for k in ("input_ids", "labels", "length")}).save_to_disk(str(tokenized))
    folder = recipe.run_dir("prepare")
    with runs.StageRun(recipe, "prepare") as stage:
        stage.record(artifacts.Prepared(splits={}, tokenized={"train": tokenized}, rows={"train": len(data["length"])},
                                        report=folder / "report.json", lengths_png=folder / "lengths.png"))
    summary = train.run(recipe)
    log = [json.loads(x) for x in (recipe.run_dir("train") / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if x["loss"] is not None]
    # after the first logged window (start-up: first allocations, kernel compilation)
    logged = [x for x in log if x["loss"] is not None]
    steady_tps = None
    if len(logged) > 1 and logged[-1]["time"] > logged[0]["time"]:
        steady_tps = (logged[-1]["tokens"] - logged[0]["tokens"]) / (logged[-1]["time"] - logged[0]["time"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's peak, before the quality check
    from finetune import models

    pad_id = models.load_tokenizer(models.resolve(model_path).path).pad_token_id
    quality = heldout_loss(_fp32_with_adapter(model_path, recipe.run_dir("train") / "adapter"), data["heldout"], pad_id)
    return {"seconds": summary["seconds"], "steps": summary["steps"], "loss_first": losses[:1],
            "loss_last": losses[-1:], "attn": summary["attn_implementation"], "base_dtype": summary["base_dtype"],
            "kernels": summary.get("kernels"), "steady_tokens_per_s": steady_tps, "peak_rss_mb": peak,
            "heldout_loss": quality}


# ------------------------------------------------------------------------------------------ large vocabulary
LARGE_VOCAB = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256,
                   max_position_embeddings=32768, final_logit_softcapping=None, sliding_window=512)


def arm_large_vocab(chunked: bool, layers: int, seq: int, batch: int, n_steps: int) -> dict:
    """One arm of --large-vocab in this process: build, warm up one step, time ``n_steps``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from finetune import hardware
    from finetune.training import attention, batching, steps

    torch.set_num_threads(hardware.threads())
    cuda = torch.cuda.is_available()
    config = Gemma3TextConfig(**LARGE_VOCAB, num_hidden_layers=layers,
                              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation=attention.register(),
                                           dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    device = "cuda" if cuda else "cpu"
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=HYPER["lr"])
    rng = random.Random(1)

    def micro_batch():
        rows = []
        for _ in range(batch):
            ids = [rng.randrange(3, LARGE_VOCAB["vocab_size"]) for _ in range(seq)]
            rows.append((ids, [-100] * (seq // 10) + ids[seq // 10:]))
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batching.collate_packed(rows).items()}

    def step(b):
        with torch.autocast(device, dtype=torch.bfloat16) if cuda else torch.autocast(device, enabled=False):
            loss = steps.forward_loss_sum(model, b, chunked=chunked)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss) / int((b["labels"][0, 1:] != -100).sum())

    batches = [micro_batch() for _ in range(n_steps + 1)]
    loaded_rss = _reset_peak_rss()  # the loaded model: the steps' peak is measured above it
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    losses = [step(batches[0])]  # warm-up: first allocations (its memory counts, its time does not)
    started = time.perf_counter()
    for b in batches[1:]:
        losses.append(step(b))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out = {"arm": "chunked" if chunked else "full", "tokens_per_s": n_steps * batch * seq / seconds,
           "seconds": seconds, "losses": losses, "rss_after_load_mb": loaded_rss, "peak_rss_mb": _status_mb("VmHWM")}
    out["step_peak_mb"] = out["peak_rss_mb"] - loaded_rss
    if cuda:
        out["step_peak_mb"] = (torch.cuda.max_memory_allocated() - loaded) / 2**20
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _reset_peak_rss() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5); returns that RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def large_vocab(ns) -> None:
    import platform

    print(f"large vocabulary: {LARGE_VOCAB['vocab_size']:,} tokens, width {LARGE_VOCAB['hidden_size']}, "
          f"{ns.lv_layers} layers, LoRA r={HYPER['r']}; micro-batch {ns.lv_batch} x {ns.lv_seq} tokens packed, "
          f"{ns.lv_steps} timed steps; cores {os.cpu_count()}, {platform.processor() or platform.machine()}")
    results = {}
    for arm in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--child", f"lv-{arm}", "--lv-layers", str(ns.lv_layers),
                               "--lv-seq", str(ns.lv_seq), "--lv-batch", str(ns.lv_batch), "--lv-steps",
                               str(ns.lv_steps)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{arm} arm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = results[arm] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{arm:8s} {res['tokens_per_s']:8.1f} tok/s  step peak {res['step_peak_mb']:8.0f} MB  "
              f"(peak RSS {res['peak_rss_mb']:.0f} MB, {res['rss_after_load_mb']:.0f} MB after loading)  "
              f"losses {' '.join(f'{x:.6f}' for x in res['losses'])}", flush=True)
    full, chunked = results["full"], results["chunked"]
    diff = max(abs(a - b) for a, b in zip(full["losses"], chunked["losses"], strict=True))
    print(f"\nchunked / full: speed {chunked['tokens_per_s'] / full['tokens_per_s']:.2f}x, step peak memory "
          f"{chunked['step_peak_mb'] / full['step_peak_mb']:.2f}x ({full['step_peak_mb']:.0f} -> "
          f"{chunked['step_peak_mb']:.0f} MB), largest loss difference {diff:.2e}")
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))


def child(arm: str, data_path: Path, model_path: str, overrides: list[str]) -> None:
    data = json.loads(data_path.read_text())
    with tempfile.TemporaryDirectory() as work:
        if arm == "vanilla":
            result = arm_vanilla(data, model_path, Path(work))
        else:
            result = arm_finetune(data, model_path, Path(work), overrides)
    result["tokens"] = sum(data["length"])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(0)
    print("RESULT " + json.dumps(result), flush=True)


def run_arm(arm: str, data_path: Path, model_path: str, overrides: list[str]) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", "vanilla" if arm == "vanilla" else "finetune",
                           "--data", str(data_path), "--model", model_path] + [f"--set={o}" for o in overrides],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{arm} arm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["process_seconds"] = round(time.time() - started, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64, help="conversations to train on (one epoch)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the arms this many times; best round counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=16, help="held-out conversations for the equal-quality check")
    p.add_argument("--base", help="a local model folder to train (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=OVERRIDES",
                   help="also time finetune with these recipe overrides (space-separated key=value), e.g. "
                        "no-liger='train.kernels=none'; repeatable")
    p.add_argument("--large-vocab", action="store_true",
                   help="time the loss on a 262k-vocabulary model instead: full logits vs chunked")
    p.add_argument("--lv-layers", type=int, default=4, help="--large-vocab: decoder layers")
    p.add_argument("--lv-seq", type=int, default=1024, help="--large-vocab: tokens per sequence")
    p.add_argument("--lv-batch", type=int, default=2, help="--large-vocab: sequences per micro-batch")
    p.add_argument("--lv-steps", type=int, default=3, help="--large-vocab: timed steps (after one warm-up)")
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["vanilla", "finetune", "lv-full", "lv-chunked"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child in ("lv-full", "lv-chunked"):
        res = arm_large_vocab(ns.child == "lv-chunked", ns.lv_layers, ns.lv_seq, ns.lv_batch, ns.lv_steps)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if ns.child:
        child(ns.child, ns.data, ns.model, ns.set)
        return
    if ns.large_vocab:
        large_vocab(ns)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.json"
        info = make_data(ns.examples, ns.seed, data_path, ns.base, ns.heldout)
        print(f"data: {info['examples']} conversations, {info['tokens']} tokens, lengths {info['min_len']}-"
              f"{info['max_len']} (mean {info['mean_len']}); cores {os.cpu_count()}")
        arms = {"vanilla": [], "finetune": []}
        for v in ns.variant:
            label, _, text = v.partition("=")
            arms[label] = text.split()
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for r in range(ns.rounds):
            for arm, overrides in arms.items():
                res = run_arm(arm, data_path, info["model"], overrides)
                results[arm].append(res)
                steady = (f"  steady {res['steady_tokens_per_s']:8.1f} tok/s" if res.get("steady_tokens_per_s")
                          else "")
                gpu = f"  peak GPU {res['peak_gpu_mb']:7.0f} MB" if "peak_gpu_mb" in res else ""
                print(f"round {r + 1} {arm:9s} {res['tokens_per_s']:8.1f} tok/s  {res['seconds']:7.1f} s  "
                      f"{res['steps']} steps  peak RSS {res['peak_rss_mb']:7.0f} MB{gpu}  held-out loss "
                      f"{res['heldout_loss']:.4f}{steady}  {' '.join(overrides)}", flush=True)
    best = {arm: max(rs, key=lambda x: x["tokens_per_s"]) for arm, rs in results.items()}
    ratio = best["finetune"]["tokens_per_s"] / best["vanilla"]["tokens_per_s"]
    mem = best["finetune"]["peak_rss_mb"] / best["vanilla"]["peak_rss_mb"]
    print(f"\nvanilla Trainer+peft (fp32, padded): {best['vanilla']['tokens_per_s']:.1f} tok/s, "
          f"peak RSS {best['vanilla']['peak_rss_mb']:.0f} MB")
    print(f"finetune train:                      {best['finetune']['tokens_per_s']:.1f} tok/s, "
          f"peak RSS {best['finetune']['peak_rss_mb']:.0f} MB")
    q_v, q_f = best["vanilla"]["heldout_loss"], best["finetune"]["heldout_loss"]
    print(f"held-out loss after the same {best['finetune']['tokens']} tokens: vanilla {q_v:.4f}, finetune {q_f:.4f} "
          f"({(q_f - q_v) / q_v:+.1%})")
    print(f"speed ratio {ratio:.2f}x at that quality (target >= 2.5), memory ratio {mem:.2f} (target <= 1.0)")
    for arm in [a for a in best if a not in ("vanilla", "finetune")]:
        print(f"variant {arm}: {best[arm]['tokens_per_s']:.1f} tok/s, ratio "
              f"{best[arm]['tokens_per_s'] / best['vanilla']['tokens_per_s']:.2f}x, held-out loss "
              f"{best[arm]['heldout_loss']:.4f} ({' '.join(arms[arm])})")
    if "peak_gpu_mb" in best["finetune"]:
        gpu_mem = best["finetune"]["peak_gpu_mb"] / best["vanilla"]["peak_gpu_mb"]
        print(f"GPU {best['finetune']['gpu']}: peak GPU memory vanilla {best['vanilla']['peak_gpu_mb']:.0f} MB, "
              f"finetune {best['finetune']['peak_gpu_mb']:.0f} MB (ratio {gpu_mem:.2f})")
    if ns.json:
        ns.json.write_text(json.dumps({"data": info, "results": results, "ratio": ratio, "memory_ratio": mem},
                                      indent=1))


if __name__ == "__main__":
    main()
