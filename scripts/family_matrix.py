"""The family matrix: a tiny twin of each model family (scripts/twins.py) through the whole pipeline.

    python scripts/family_matrix.py                       # every family
    python scripts/family_matrix.py --families qwen3,gemma3 --json matrix.json
    python scripts/family_matrix.py --jobs 2              # two families at a time, one core each

For each family:
1. prime: the random twin is fitted for a few dozen full-batch steps on a handful of chats in its own template
   (all tokens, so it learns the template and to end its turns with the family's end-of-turn token): its
   predictions are then peaked where the chats are, so logit agreement means something, and it stops by itself.
2. prepare: a recipe pointing model.id at the primed twin, over chats with a system prompt and several turns.
3. train: LoRA for three epochs on chats whose answers differ from the primed ones (the epoch-mean loss must fall).
4. export: merge, GGUF F16 + Q8_0 + the adapter GGUF, and export's own parity checks (tokenization exact, chat
   prompt exact, teacher-forced top-1 agreement over positions where HF's top two differ by a margin, KL,
   greedy chat ends at the family's end of turn); the matrix asks more of that greedy chat: every answer on the
   F16 GGUF must stop by itself.
5. serve: `finetune serve RECIPE` answers one request through the openai client, and the answer ends with
   finish_reason "stop".
6. ollama: the Modelfile has a TEMPLATE and a stop line for the end-of-turn token.

Besides one row per twin, VARIANTS are rows that run a twin (and its primed twin) with a recipe that takes another
path through the toolkit: gpt-oss-experts trains LoRA on the experts' fused tensors (train.lora.experts), and its
export stage also checks that the merge changed every expert tensor.

Prints a table family x stage (pass/fail with the figure), writes it as JSON (--json), exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import twins  # noqa: E402

STAGES = ("prime", "prepare", "train", "export", "serve", "ollama")
SYSTEM = "You are a terse assistant."
# The chats the twin is primed on (its "pretraining"), and the LoRA data: the same questions with other answers.
QA = [("Hi", "Hello! How can I help?"), ("What is 2+2?", "4"), ("Name a colour.", "Blue."),
      ("Capital of France?", "Paris."), ("Say yes.", "Yes."), ("Count to three.", "One, two, three."),
      ("Opposite of hot?", "Cold."), ("A fruit?", "An apple.")]
LORA_ANSWERS = {"Name a colour.": "Green.", "A fruit?": "A pear.", "Say yes.": "Yes, indeed.",
                "Opposite of hot?": "Cold, of course."}
PRIME_STEPS = 60
PRIME_LR = 5e-3
PRIME_KEEP = 24
TRAIN_STEPS = 9  # three epochs of the 24 training chats in batches of 8


@dataclass(frozen=True)
class Variant:
    twin: str                # the twins.FAMILIES entry it runs (the same twin and primed twin: nothing new to build)
    recipe: dict[str, Any]   # recipe sections merged over the matrix's own
    label: str               # what the row adds, after the architecture in the README's table


VARIANTS = {
    # llama.cpp's LoRA converter writes no adapter for expert tensors (validate refuses adapter_gguf with experts)
    "gpt-oss-experts": Variant("gpt-oss", {"train": {"lora": {"experts": True}}, "export": {"adapter_gguf": False}},
                               "LoRA on the experts"),
}
# Every row of the matrix: each twin, and each variant right after its twin.
ROWS = [row for name in twins.FAMILIES for row in [name, *[v for v, x in VARIANTS.items() if x.twin == name]]]


def twin_of(row: str) -> str:
    return VARIANTS[row].twin if row in VARIANTS else row


def family_of(row: str) -> twins.Family:
    return twins.FAMILIES[twin_of(row)]


def merged_over(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def conversations(answers: dict[str, str] | None = None) -> list[list[dict]]:
    """Single-turn chats with and without a system prompt, and two-turn chats: every shape prepare must render."""
    qa = [(q, (answers or {}).get(q, a)) for q, a in QA]
    out = []
    for i, (q, a) in enumerate(qa):
        chat = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append([{"role": "system", "content": SYSTEM}, *chat] if i % 2 == 0 else chat)
        q2, a2 = qa[(i + 3) % len(qa)]
        out.append([{"role": "system", "content": SYSTEM}, *chat, {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2}])
    return out


def supports_system(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False)
    except Exception:  # Gemma 2's template raises on a system message
        return False
    return True


def without_system(chats: list[list[dict]]) -> list[list[dict]]:
    return [[m for m in c if m["role"] != "system"] for c in chats]


# ------------------------------------------------------------------------------------------------ prime
class SubsetHead:
    """The output layer restricted to the token ids the matrix's chats use (a torch module built lazily, so
    importing this script stays light). Priming is a stand-in for pretraining: the twin only has to predict
    those chats, and a full softmax over a 128k-262k vocabulary was nearly the whole cost of a priming step
    (Gemma 3/4: ~14 minutes). Logit soft-capping and scaling still apply: the models call it as their lm_head."""

    def __new__(cls, head, ids):
        import torch

        class _Head(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.head, self.ids = head, ids

            def forward(self, hidden):
                bias = None if self.head.bias is None else self.head.bias[self.ids]
                return torch.nn.functional.linear(hidden, self.head.weight[self.ids], bias)

        return _Head()


def priming_token_ids(tok, system_ok: bool) -> list[int]:
    """Every token id of the chats the matrix renders (priming, LoRA data, the served question), and the
    tokenizer's special tokens: the vocabulary the primed twin learns to predict."""
    ids = set(tok.all_special_ids)
    for answers in (None, LORA_ANSWERS):
        chats = conversations(answers)
        for chat in chats if system_ok else without_system(chats):
            ids.update(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    return sorted(ids)


def prime_key() -> str:
    """The primed twin's folder depends on how it was primed (a change re-primes every twin)."""
    import hashlib

    return hashlib.sha256(repr((PRIME_STEPS, PRIME_LR, PRIME_KEEP, "subset-head")).encode()).hexdigest()[:8]


def prime(name: str, twin: Path, log=print) -> dict[str, Any]:
    """Fit the twin on the chats (cached next to it); returns {"path", "loss_first", "loss_last", ...}."""
    from filelock import FileLock

    out = twin.parent / f"{twin.name}-primed-{prime_key()}"
    done = out / "primed.json"
    if done.exists():
        return {"path": out, **json.loads(done.read_text())}
    with FileLock(str(out) + ".lock"):  # processes priming the same twin at once: one primes, the others wait
        if not done.exists():
            _prime(twin, out)
    return {"path": out, **json.loads(done.read_text())}


def _prime(twin: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.run import runs

    tok = AutoTokenizer.from_pretrained(twin)
    system_ok = supports_system(tok)
    chats = conversations() if system_ok else without_system(conversations())
    rows = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in chats]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Rows padded on the left, so every row ends with its last answer and end of turn, and only the last KEEP
    # positions get logits, over the chats' own tokens only (SubsetHead).
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vocab = torch.tensor(priming_token_ids(tok, system_ok))
    index = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    targets = index[ids[:, -PRIME_KEEP + 1:]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32)
    model.config.use_cache = False
    full_head = model.lm_head
    model.lm_head = SubsetHead(full_head, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=PRIME_LR)
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: more threads mostly wait for each other
    for _ in range(PRIME_STEPS):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=PRIME_KEEP).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    model.lm_head = full_head
    model.config.use_cache = True
    figures = {"loss_first": losses[0], "loss_last": losses[-1], "steps": PRIME_STEPS, "vocab_trained": len(vocab)}
    with runs.atomic_dir(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        for f in twin.iterdir():  # tokenizer files, chat template, the Hub-like generation config
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
                shutil.copyfile(f, Path(tmp) / f.name)
        (Path(tmp) / "primed.json").write_text(json.dumps(figures))


# ------------------------------------------------------------------------------------------------ stages
def adapter_refusal(family: twins.Family) -> str | None:
    """Why the toolkit refuses export.adapter_gguf for this family (llama.cpp cannot write its adapter), or None."""
    from finetune.gguf import convert

    return convert.adapter_gguf_problem(family.arch)


def write_recipe(name: str, model_dir: Path, work: Path, system_ok: bool) -> Path:
    import yaml

    from finetune import hardware

    chats = conversations(LORA_ANSWERS)
    if not system_ok:
        chats = without_system(chats)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats * 2))
    recipe = {
        "name": name.replace(".", "_"), "runs_dir": str(work / "runs"), "seed": 0,
        "model": {"id": str(model_dir)},
        "data": {"sources": [{"path": str(data)}], "split": {"validation": 0.125, "test": 0.125},
                 "clean": {"near_dedupe": False, "dedupe": False, "max_tokens": 256}},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16}, "lr": 3e-3, "max_steps": TRAIN_STEPS,
                  "batch_size": 8, "warmup_ratio": 0.0, "scheduler": "constant", "eval_every": TRAIN_STEPS,
                  "save_every": TRAIN_STEPS, "log_every": 1, "threads": hardware.threads(cap=2)},
        # the adapter GGUF where llama.cpp can write one: elsewhere validate/train refuse it (checked in the cell)
        "export": {"quantizations": ["Q8_0"], "adapter_gguf": adapter_refusal(family_of(name)) is None},
        # n_ctx: room for the longest default system prompt (Mistral Small 3.2: ~500 tokens) plus the answer
        "serve": {"quant": "F16", "n_ctx": 2048, "max_tokens": 64, "threads": 1},
    }
    if name in VARIANTS:
        recipe = merged_over(recipe, VARIANTS[name].recipe)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def stage_prepare(recipe) -> dict[str, Any]:
    from finetune import prepare

    report = prepare.run(recipe, force=True)
    rows = report["splits"]
    return {"ok": rows["train"] > 0 and rows["test"] > 0, "figure": f"{rows['train']}/{rows['validation']}/{rows['test']} rows",
            "rows": rows}


def stage_train(recipe) -> dict[str, Any]:
    from finetune import train

    train.run(recipe)
    log = [json.loads(x) for x in (recipe.run_dir("train") / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in log if r.get("loss") is not None]
    # One step's loss depends on which chats its batch drew (packed batches differ in size): compare the
    # token-weighted mean loss of the first epoch with that of the last.
    epochs: dict[int, list[tuple[float, int]]] = {}
    seen = 0
    for r in steps:
        epochs.setdefault(math.ceil(r["epoch"] - 1e-9), []).append((r["loss"], r["tokens"] - seen))
        seen = r["tokens"]
    means = [sum(loss * n for loss, n in e) / max(1, sum(n for _, n in e)) for _, e in sorted(epochs.items())]
    first, last = means[0], means[-1]
    ok = len(means) > 1 and last < first
    return {"ok": ok, "figure": f"loss {first:.2f}->{last:.2f}", "loss_first": first, "loss_last": last,
            "epochs": len(means),
            **({} if ok else {"error": f"the epoch-mean training loss did not fall ({first:.3f} -> {last:.3f})"})}


def stage_export(recipe, family: twins.Family) -> dict[str, Any]:
    from finetune import export

    exported = export.run(recipe, log=lambda *_: None)
    if exported.parity is None:
        raise ValueError("the family matrix needs export.parity on: the export wrote no parity.json")
    report = json.loads(exported.parity.read_text())
    f16, q8 = report["types"]["F16"]["logits"], report["types"]["Q8_0"]["logits"]
    eot = report["end_of_turn"]["end_of_turn"][0]["token"] if report["end_of_turn"].get("end_of_turn") else None
    # Does the twin end its turn by itself on the F16 GGUF? Export's own greedy chat over the held-out prompts
    # answers it: every answer must stop (stricter than export's check, which lets a prompt ramble where HF does too).
    answers = report["greedy_chat"].get("answers") or [{"text": "", "finish_reason": "no answer"}]
    stopped = all(a["finish_reason"] == "stop" for a in answers)
    answer = {"text": answers[0]["text"], "finish_reason": "stop" if stopped else answers[0]["finish_reason"]}
    problems = []
    if recipe.export.adapter_gguf and exported.adapter_gguf is None:
        problems.append("no adapter GGUF was written")
    experts = expert_changes(Path(recipe.model.id), exported.merged) if recipe.train.lora.experts else None
    if experts is not None and (not experts["tensors"] or experts["changed"] < experts["tensors"]):
        problems.append(f"the merge changed {experts['changed']} of the {experts['tensors']} expert tensors "
                        f"(unchanged: {', '.join(experts['unchanged'][:4])})")
    if eot != family.end_of_turn:
        problems.append(f"end of turn is {eot!r}, the family's is {family.end_of_turn!r}")
    if not stopped:
        problems.append(f"a greedy F16 chat did not stop within {export.GREEDY_MAX_TOKENS} tokens: "
                        f"{[a['text'][:60] for a in answers if a['finish_reason'] != 'stop']}")
    top1 = f16.get("judged_top1", f16["top1_agreement"])
    out = {"ok": report["ok"] and not problems, "end_of_turn": eot, "stopped": stopped,
           "answer": answer["text"], "f16_top1": top1, "f16_kl": f16["kl_mean"],
           "f16_judged_over": f16.get("judged_over"), "f16_top1_all": f16["top1_agreement"],
           "q8_top1": q8.get("judged_top1", q8["top1_agreement"]), "q8_kl": q8["kl_mean"],
           "adapter_top1": (report.get("adapter") or {}).get("top1_agreement"), "adapter_refused": adapter_refusal(family),
           "adapter_gguf": recipe.export.adapter_gguf, "experts": experts,
           "tokenization": report["tokenization"].get("ok"), "chat_prompt": report["chat_prompt"].get("ok"),
           "greedy_stopped": report["greedy_chat"].get("gguf_stopped"),
           "figure": f"F16 top1 {top1:.3f} KL {f16['kl_mean']:.1e}, Q8 {out_q(q8)}, stop {eot} "
                     f"{'seen' if stopped else 'NOT seen'}"
                     + (f", experts changed {experts['changed']}/{experts['tensors']}" if experts else ""),
           "gguf": {q: str(p) for q, p in exported.gguf.items()}, "parity": str(exported.parity)}
    if problems:
        out["error"] = "; ".join(problems)
    if not report["ok"]:
        out["error"] = "; ".join(report["failed"] + problems)[:2000]
    return out


def expert_changes(base_dir: Path, merged_dir: Path) -> dict[str, Any]:
    """How many of the experts' fused weight tensors (3-d, one per layer and projection) the merge changed, and the
    largest change relative to the base tensor's norm: LoRA on the experts that merged into nothing proves nothing."""
    import torch
    from safetensors import safe_open

    from finetune.training.model_setup import in_experts

    def experts(folder: Path) -> dict[str, Any]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                fused = [k for k in f.keys() if in_experts(k) and len(f.get_slice(k).get_shape()) == 3]
                out.update({k: f.get_tensor(k).float() for k in fused})
        return out

    base, merged = experts(base_dir), experts(merged_dir)
    unchanged = [k for k in base if k not in merged or torch.equal(base[k], merged[k])]
    relative = [float((merged[k] - base[k]).norm() / base[k].norm()) for k in base if k in merged]
    return {"tensors": len(base), "changed": len(base) - len(unchanged), "unchanged": unchanged,
            "max_relative_change": max(relative, default=0.0)}


def out_q(q: dict) -> str:
    return f"{q.get('judged_top1', q['top1_agreement']):.3f}"


def stage_serve(recipe_path: Path, recipe) -> dict[str, Any]:
    import openai

    from serve.launch import ServerProcess

    with ServerProcess(recipe_path, [], startup_timeout=240) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        name = server.health()["model"]
        r = client.chat.completions.create(model=name, max_tokens=64, temperature=0,
                                           messages=[{"role": "user", "content": QA[1][0]}])
    choice = r.choices[0]
    reasoning = getattr(choice.message, "reasoning_content", None)  # thinking templates (Qwen3.5): apart from content
    ok = isinstance(choice.message.content, str) and choice.finish_reason == "stop"
    out = {"ok": ok, "finish_reason": choice.finish_reason, "answer": choice.message.content, "reasoning": reasoning,
           "figure": f"{choice.finish_reason}: {(choice.message.content or '')[:24]!r}"
                     + (f" (reasoning {reasoning[:16]!r})" if reasoning else "")}
    if not ok:
        out["error"] = f"the served answer did not end by itself (finish_reason {choice.finish_reason!r})"
    return out


def stage_ollama(recipe, family: twins.Family) -> dict[str, Any]:
    modelfile = (recipe.run_dir("export") / "Modelfile").read_text()
    has_template = "\nTEMPLATE " in modelfile
    stops = [ln.split(" ", 2)[2] for ln in modelfile.splitlines() if ln.startswith("PARAMETER stop ")]
    ok = has_template and f'"{family.end_of_turn}"' in stops
    out = {"ok": ok, "template": has_template, "stops": stops,
           "figure": f"TEMPLATE {'yes' if has_template else 'NO'}, stop {', '.join(stops) or 'none'}"}
    if not ok:
        out["error"] = ("the Modelfile has no TEMPLATE (Ollama would guess the prompt format)" if not has_template
                        else f"the Modelfile does not stop on {family.end_of_turn!r} (stops: {stops})")
    return out


# ------------------------------------------------------------------------------------------------ driver
def run_family(name: str, work: Path, log=print) -> dict[str, dict[str, Any]]:
    from finetune import recipe as recipe_mod

    family = family_of(name)
    cells: dict[str, dict[str, Any]] = {}
    recipe = recipe_path = None
    for stage in STAGES:
        t = time.time()
        try:
            if stage == "prime":
                twin = twins.build(twin_of(name), log=log)
                primed = prime(twin_of(name), twin, log=log)
                from transformers import AutoTokenizer

                system_ok = supports_system(AutoTokenizer.from_pretrained(primed["path"]))
                cell = {"ok": primed["loss_last"] < primed["loss_first"] / 4,
                        "figure": f"loss {primed['loss_first']:.2f}->{primed['loss_last']:.2f}",
                        "loss_first": primed["loss_first"], "loss_last": primed["loss_last"], "twin": str(twin)}
                recipe_path = write_recipe(name, primed["path"], work, system_ok)
                recipe = recipe_mod.load(recipe_path)
            elif stage == "prepare":
                cell = stage_prepare(recipe)
            elif stage == "train":
                cell = stage_train(recipe)
            elif stage == "export":
                cell = stage_export(recipe, family)
            elif stage == "serve":
                cell = stage_serve(recipe_path, recipe)
            else:
                cell = stage_ollama(recipe, family)
        except Exception as exc:  # a stage's failure is this cell's figure; later stages cannot run
            cell = {"ok": False, "figure": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:]}
        cell["seconds"] = round(time.time() - t, 1)
        cells[stage] = cell
        log(f"[{name}] {stage}: {'pass' if cell['ok'] else 'FAIL'} {cell['figure']} ({cell['seconds']} s)"
            + (f"\n    {cell['error'][:1500]}" if not cell["ok"] and cell.get("error") else ""))
        if not cell["ok"]:
            for rest in STAGES[STAGES.index(stage) + 1:]:
                cells[rest] = {"ok": False, "figure": "not run", "seconds": 0.0, "error": f"{stage} failed"}
            break
    return cells


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = [["family", *STAGES, "seconds"]]
    for name, cells in results.items():
        rows.append([name, *[f"{'pass' if cells[s]['ok'] else 'FAIL'} {cells[s]['figure']}" for s in STAGES],
                     f"{sum(c['seconds'] for c in cells.values()):.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def escaped(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a Markdown table cell


def markdown(runs: list[dict[str, Any]]) -> str:
    """The README's family table from one or more --json files (a family's latest run wins)."""
    latest: dict[str, tuple[dict, dict]] = {}
    for run in sorted(runs, key=lambda r: r["date"]):
        for name, cells in run["families"].items():
            latest[name] = (run, cells)
    lines = ["| family | twin of | architecture | LoRA loss | F16 top-1 / KL | Q8_0 top-1 | adapter top-1 | end of turn "
             "| served | Ollama | s | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in ROWS if n in latest]:
        run, cells = latest[name]
        f = family_of(name)
        arch = f"{f.arch} ({VARIANTS[name].label})" if name in VARIANTS else f.arch
        when = f"{run['date']}, `{run['command']}`"
        if not all(c["ok"] for c in cells.values()):
            bad = next(s for s in STAGES if not cells[s]["ok"])
            error = escaped((cells[bad].get("error") or "").splitlines()[0][:160])
            lines.append(f"| {name} | {f.title} | {arch} | **fails at {bad}**: {error} | | | | | | | | {when} |")
            continue
        ex, tr = cells["export"], cells["train"]
        lines.append(
            f"| {name} | {f.title} | {arch} | {tr['loss_first']:.2f} -> {tr['loss_last']:.2f} | "
            f"{ex['f16_top1']:.3f} / {ex['f16_kl']:.0e} | {ex['q8_top1']:.3f} | {adapter_cell(ex)} | "
            f"`{escaped(ex['end_of_turn'])}` seen | {cells['serve']['finish_reason']} | "
            f"{'TEMPLATE + stop' if cells['ollama']['ok'] else 'no'} | {sum(c['seconds'] for c in cells.values()):.0f} "
            f"| {when} |")
    return "\n".join(lines)


def adapter_cell(export_cell: dict) -> str:
    if export_cell.get("adapter_top1") is not None:
        return f"{export_cell['adapter_top1']:.3f}"
    if export_cell.get("experts"):
        return "none: no GGUF adapter for expert tensors"
    return "refused: llama.cpp cannot write it" if export_cell.get("adapter_refused") else "none"


def write_json(path: Path, results: dict, seconds: float, families: str | None) -> None:
    import platform

    path.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "seconds": round(seconds, 1), "cores": os.cpu_count(),
        "machine": platform.machine(),
        "command": "python scripts/family_matrix.py" + (f" --families {families}" if families else ""),
        "families": results}, indent=2, default=str) + "\n")


def groups(names: list[str]) -> list[list[str]]:
    """The rows in work units: a twin's row and its variants together (they share the twin and the primed twin)."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(twin_of(name), []).append(name)
    return list(out.values())


def core_slots(jobs: int) -> list[set[int]]:
    """The cores each of ``jobs`` workers runs on: this process's cores split evenly (shared when jobs > cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if jobs >= len(cores):
        return [{cores[i % len(cores)]} for i in range(jobs)]
    per = len(cores) // jobs
    return [set(cores[i * per:(i + 1) * per]) for i in range(jobs)]


def run_parallel(names: list[str], root: Path, jobs: int, quiet: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """Each work unit in a child process of this script, ``jobs`` at a time, each child on its own share of the
    cores (so the trainings, conversions and servers of two families never fight over one core's threads); the
    children's stage lines are printed as each unit ends."""
    import queue
    import subprocess
    import threading

    todo: queue.Queue[list[str]] = queue.Queue()
    for unit in groups(names):
        todo.put(unit)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    lock = threading.Lock()

    def worker(cores: set[int]) -> None:
        while True:
            try:
                unit = todo.get_nowait()
            except queue.Empty:
                return
            out = root / f".unit-{unit[0]}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--families", ",".join(unit), "--work", str(root),
                   "--json", str(out), "--unit"] + (["--quiet"] if quiet else [])
            pin = (lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None
            env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), "MKL_NUM_THREADS": str(len(cores))}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, preexec_fn=pin)
            got = json.loads(out.read_text())["families"] if out.exists() else {}
            with lock:
                sys.stdout.write(proc.stdout)
                sys.stdout.flush()
                for name in unit:
                    results[name] = got.get(name) or {stage: {
                        "ok": False, "figure": "worker died", "seconds": 0.0,
                        "error": f"the worker process exited {proc.returncode}: {proc.stderr[-1500:]}"} for stage in STAGES}

    threads = [threading.Thread(target=worker, args=(cores,)) for cores in core_slots(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {name: results[name] for name in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Take a tiny twin of each model family through prepare, train, export "
                                "(parity), serve and Ollama; print a family x stage table; exit 1 on any failure.")
    p.add_argument("--families", help=f"comma-separated subset (default: all): {','.join(ROWS)}")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--work", help="keep the runs in this folder (default: a temporary folder, removed)")
    p.add_argument("--markdown", metavar="JSON", nargs="+",
                   help="print the README's table from earlier --json files (latest run of each family) and exit")
    p.add_argument("--quiet", action="store_true", help="print only the stage lines and the table, not the stages' own output")
    p.add_argument("--jobs", type=int, default=1,
                   help="families run at once, each in its own process on its share of the cores (default 1)")
    p.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)  # a --jobs worker: stage lines only
    ns = p.parse_args(argv)
    if ns.markdown:
        print(markdown([json.loads(Path(f).read_text()) for f in ns.markdown]))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    names = [n.strip() for n in ns.families.split(",")] if ns.families else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(ROWS)}")
    t0 = time.time()
    root = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="family-matrix-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        if ns.jobs > 1 and len(groups(names)) > 1:
            root.mkdir(parents=True, exist_ok=True)
            results = run_parallel(names, root, ns.jobs, ns.quiet)
            names = []  # done
        for name in names:
            work = root / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            with (work / "output.log").open("w") as sink, contextlib.ExitStack() as quiet:
                if ns.quiet:  # the stages' own progress lines go to <work>/<family>/output.log
                    quiet.enter_context(contextlib.redirect_stdout(sink))
                    quiet.enter_context(contextlib.redirect_stderr(sink))
                results[name] = run_family(name, work, log=lambda *a: print(*a, file=sys.__stdout__, flush=True))
            if ns.json:  # after every family: an interrupted matrix keeps what it measured
                write_json(Path(ns.json), results, time.time() - t0, ns.families)
    finally:
        if not ns.work:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.time() - t0
    failed = [n for n, cells in results.items() if not all(c["ok"] for c in cells.values())]
    if ns.unit:
        return 1 if failed else 0
    print()
    print(table(results))
    print(f"\n{len(results) - len(failed)} of {len(results)} families passed every stage in {seconds:.0f} s"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    if ns.json:
        write_json(Path(ns.json), results, seconds, ns.families)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
