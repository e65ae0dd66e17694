"""One-shot llama.cpp jobs (inspect, tokenize, chat, logits, quantize) in a child process: a native crash becomes a
clear error, not a dead caller.

Every public function here starts the llama.cpp worker process (``finetune.gguf.client.Worker.run``) on one job
(or several, ``run_many``); it loads the GGUF, does the job and sends its result back. The caller never imports
``llama_cpp``. Chat generates with the worker's own loop (``finetune.gguf.worker.Generator.sample``).

Chat always uses the GGUF's own chat template (``tokenizer.chat_template``) through llama-cpp-python's Jinja
formatter. llama-cpp-python silently falls back to the ``llama-2`` prompt format when a GGUF has no template, and
it replaces some templates by a built-in format it guesses from the metadata; neither happens here: a GGUF without
a template is refused.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune import hardware
from finetune.errors import UserError
from finetune.gguf.worker import load_llama

# llama_ftype ids (llama.h) for the types llama_model_quantize can write.
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
    "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
}
# Types llama.cpp's own quantize tool refuses without an importance matrix (llama.cpp tools/quantize).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}


# compare_logits: a position is "decisive" when the reference's top token beats its second by this much probability.
DECISIVE_MARGIN = 0.05


class RuntimeCrash(UserError):
    """The llama.cpp child process died (a native crash) or gave no result."""


GGUF_MAGIC = b"GGUF"
_CHECKED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of the files check_gguf passed


def check_gguf(path: str | Path, *, what: str = "") -> None:
    """Refuse a file that is not a GGUF before llama.cpp tries it (llama.cpp only says "Failed to load model from
    file"): every GGUF starts with the bytes GGUF. ``what`` names the setting or argument that gave the path. Each
    file is read once (again only when it changed)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] != GGUF_MAGIC:
        printable = all(32 <= b < 127 or b in (9, 10, 13) for b in head[:12])
        shown = head[:12].decode("ascii") if printable else head[:4].hex(" ")
        kind = "is empty" if not head else f"starts with {shown!r}, not GGUF"
        raise UserError(f"{what + ': ' if what else ''}{path} is not a GGUF (it {kind}): a download that saved an "
                        "error page, or another kind of file under a .gguf name? Point at a real .gguf file.")
    _CHECKED.add(key)


# ------------------------------------------------------------------------------------------ public API
def chat(gguf_path: str | Path, conversations: list[list[dict]], *, max_tokens: int = 128, temperature: float = 0.0,
         n_ctx: int = 2048, lora_path: str | Path | None = None, seed: int = 0, threads: int | None = None,
         timeout: float | None = None, reasoning: str = "auto", tools: list[dict] | None = None) -> list[dict]:
    """Answer each conversation with the GGUF's own chat template, rendered as the server renders it
    (``finetune.gguf.chat_format``): [{"text", "finish_reason", "tokens", "prompt_tokens", "seconds"}, ...]."""
    return _call("chat", gguf_path, {
        "conversations": conversations, "max_tokens": max_tokens, "temperature": temperature, "n_ctx": n_ctx,
        "lora_path": str(lora_path) if lora_path else None, "seed": seed, "threads": threads,
        "reasoning": reasoning, "tools": tools,
    }, timeout=timeout)


def inspect(gguf_path: str | Path) -> dict:
    """Metadata (without the token arrays), BOS/EOS ids and texts, add_bos, end-of-generation ids, n_ctx_train."""
    return _call("inspect", gguf_path, {})


def tokenize(gguf_path: str | Path, texts: list[str], *, add_special: bool = False, parse_special: bool = True) -> list[list[int]]:
    """llama.cpp's tokenization of each text."""
    return _call("tokenize", gguf_path, {"texts": texts, "add_special": add_special, "parse_special": parse_special})


def render_chat(gguf_path: str | Path, conversations: list[list[dict]], *, add_generation_prompt: bool = True,
                reasoning: str = "auto", tools: list[dict] | None = None) -> list[dict]:
    """The prompt chat() would feed the model: [{"text", "ids"}, ...] (the Jinja path, exactly as chat uses it)."""
    return _call("render_chat", gguf_path, {"conversations": conversations, "add_generation_prompt": add_generation_prompt,
                                            "reasoning": reasoning, "tools": tools})


def compare_logits(gguf_path: str | Path, sequences: list[list[int]], reference_logits: str | Path, *,
                   lora_path: str | Path | None = None, threads: int | None = None) -> dict:
    """Teacher-forced comparison against reference logits (a float32 .npy, all sequences' rows concatenated).

    Returns top-1 agreement, mean KL(reference || gguf) and both perplexities over next-token predictions.
    """
    return _call("compare_logits", gguf_path, {
        "sequences": sequences, "reference": str(reference_logits),
        "lora_path": str(lora_path) if lora_path else None, "threads": threads,
    })


def reply_logprobs(gguf_path: str | Path, conversations: list[list[dict]], replies: list[str], *,
                   threads: int | None = None) -> list[dict]:
    """How likely the GGUF is to answer each conversation with the given reply: teacher-forced on the prompt the
    server builds (``finetune.gguf.chat_format``) followed by the reply's tokens up to and including the token that
    ends the turn, as generation would produce it. [{"logprob": summed log-probability, "ids": the reply's token ids,
    "token_logprobs": one per id}, ...]; compare two replies to one prompt to see which the model prefers."""
    if len(conversations) != len(replies):
        raise ValueError(f"reply_logprobs: {len(conversations)} conversations but {len(replies)} replies")
    return _call("reply_logprobs", gguf_path, {"conversations": conversations, "replies": replies, "threads": threads})


def run_many(gguf_path: str | Path, jobs: list[tuple[str, dict]], *, timeout: float | None = None) -> list[dict]:
    """Several of the jobs above on one GGUF in ONE child process (one interpreter start, one import).

    ``jobs``: [(op, kwargs)] with op in inspect/tokenize/render_chat/chat/compare_logits/reply_logprobs and the keyword
    arguments of the function of that name. Returns [{"result": ...} | {"error": str}] in order. A native
    crash fails them all (RuntimeCrash).
    """
    requests = []
    for op, kwargs in jobs:
        if op not in _BATCHABLE:
            raise ValueError(f"run_many: unknown op {op!r}")
        requests.append(_BATCHABLE[op](_BATCH, **kwargs))  # the job as the function of that name builds it
    return _call("many", gguf_path, {"jobs": requests}, timeout=timeout)


def quantize(src: str | Path, dst: str | Path, qtype: str, *, threads: int | None = None,
             imatrix: str | Path | None = None) -> dict:
    """Write ``dst`` as ``qtype`` from an F16/BF16/F32 GGUF with llama.cpp's quantizer, guided by an importance
    matrix GGUF (``finetune.gguf.imatrix``, or one made by llama.cpp's imatrix tool) when given."""
    qtype = qtype.upper()
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise UserError(f"export.quantizations: {qtype} needs an importance matrix; turn export.imatrix on "
                        "(the default) or use Q4_K_M, Q5_K_M, Q6_K or Q8_0")
    if qtype not in FTYPES:
        raise UserError(f"export.quantizations: unknown type {qtype!r}; known: {', '.join(sorted(FTYPES))}")
    return _call("quantize", src, {"dst": str(dst), "ftype": FTYPES[qtype], "threads": threads,
                                   "imatrix": str(imatrix) if imatrix else None})


# ------------------------------------------------------------------------------------------ the parent
def omp_wait_policy(threads: int | None = None) -> str:
    """OpenMP wait policy for a llama.cpp process about to start: spin (ACTIVE) when the machine has a free core for
    each of its threads, sleep at once (PASSIVE) when it is busy. Neither is free: spinning threads that wait for a
    core held by another process made decoding several times slower on a busy machine, and sleeping threads made it
    several times slower on an idle one (scripts/bench_export.py measures both). A policy set by the user wins."""
    from finetune.gguf.worker import llama_threads

    cores = os.cpu_count() or 1  # the whole machine's, as the run-queue length it is compared with
    threads = llama_threads(threads)
    load = runnable_now()
    return "ACTIVE" if load + threads <= cores + 0.5 else "PASSIVE"


def runnable_now() -> float:
    """Threads running or ready to run right now, other than the caller. Linux's /proc/loadavg says it at this
    instant (its 4th field); the 1-minute load average would still count a training that just finished in this very
    process and choose the slow policy on an idle machine."""
    try:
        running = open("/proc/loadavg").read().split()[3].split("/")[0]
        return max(0.0, float(running) - 1)  # the reading thread itself is running
    except (OSError, IndexError, ValueError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return float(os.cpu_count() or 1)


_BATCH = object()  # in place of a GGUF path: _call returns the job instead of running it (run_many collects them)


def _call(op: str, gguf_path: str | Path, payload: dict, *, timeout: float | None = None) -> Any:
    from finetune.gguf.client import Worker
    from finetune.gguf.worker import WorkerCrashed

    if gguf_path is _BATCH:
        return {"op": op, **payload}
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    check_gguf(gguf_path)
    for lora in [payload.get("lora_path")] + [job.get("lora_path") for job in payload.get("jobs", [])]:
        if lora:
            check_gguf(lora, what="adapter")
    with tempfile.TemporaryDirectory(prefix="finetune-llama-") as tmp:
        log = Path(tmp) / "stderr.log"
        # On an assertion (GGML_ABORT) ggml forks gdb to print a backtrace; when two threads abort at once the forks
        # wait on each other and the child hangs forever instead of dying. Without it, it dies and is reported.
        env = {"OMP_WAIT_POLICY": omp_wait_policy(payload.get("threads")), "GGML_NO_BACKTRACE": "1"}
        worker = Worker({"gguf": str(gguf_path.resolve()), "job": {"op": op, **payload}, "env": env, "stderr": str(log)})
        try:
            result = worker.run(timeout)
        except WorkerCrashed as exc:
            if exc.exitcode is None:  # it timed out
                raise RuntimeCrash(str(exc)) from None
            stderr = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeCrash(_crash_message(op, gguf_path, exc.exitcode, stderr, payload)) from None
    if "error" in result:
        raise UserError(result["error"])
    return result["result"]


def _crash_message(op: str, gguf_path: Path, returncode: int, stderr: str, payload: dict) -> str:
    """One line: what died doing what, the likely cause and the fix, and llama.cpp's last log line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    last = f" Last log line: {lines[-1][:200]}" if lines else ""
    lora = payload.get("lora_path") or next((j.get("lora_path") for j in payload.get("jobs", []) if j.get("lora_path")),
                                            None)
    if returncode >= 0:
        return f"llama.cpp {op} on {gguf_path} failed (exit {returncode}).{last}"
    name = signal.Signals(-returncode).name
    if lora:
        advice = (f"llama.cpp could not load the adapter {Path(lora).name} over it: set export.adapter_gguf: false "
                  "and use the merged GGUFs")
    elif any("GGML_ASSERT" in ln for ln in lines):  # llama.cpp checked the model and gave up: not the build
        advice = ("llama.cpp stopped at one of its own checks on this model's structure, which this llama.cpp does "
                  "not run as converted; `finetune doctor MODEL` says what each stage supports")
    else:
        advice = ("a native crash on quantized models is often a CPU-specific build problem: reinstall "
                  "llama-cpp-python with scripts/install_llama_cpp.py")
    return f"llama.cpp crashed ({name}) during {op} on {gguf_path}: {advice}.{last}"


# ------------------------------------------------------------------------------------------ the child
def _renderer(llm, gguf: str, reasoning: str = "auto"):
    """The shared chat renderer (finetune.gguf.chat_format): the same prompt and stop tokens as the server."""
    from finetune.gguf.chat_format import ChatRenderer
    from finetune.gguf.worker import NoChatTemplate, no_template_message

    renderer = ChatRenderer(llm, reasoning=reasoning)
    if renderer.formatter is None:
        raise NoChatTemplate(no_template_message(gguf))
    return renderer


def _op_inspect(req: dict) -> dict:
    import llama_cpp

    from finetune.gguf.chat_format import end_of_generation_ids, vocab_of

    llm = load_llama(req["gguf"], vocab_only=True)
    vocab = vocab_of(llm)
    meta = {k: v for k, v in llm.metadata.items()}
    eog = end_of_generation_ids(llm)
    bos, eos = llm.token_bos(), llm.token_eos()

    def text(token: int) -> str:
        return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="ignore")

    return {
        "metadata": meta,
        "architecture": meta.get("general.architecture"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_id": bos, "eos_id": eos,
        "bos_text": text(bos) if bos != -1 else None,
        "eos_text": text(eos) if eos != -1 else None,
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": eog,
        "eog_texts": [text(t) for t in eog],
        # vocab_only loads report 0 for n_ctx_train: read the architecture's context_length key instead.
        "n_ctx_train": int(meta.get(f"{meta.get('general.architecture')}.context_length", 0) or 0),
        "n_vocab": llm.n_vocab(),
    }


def _op_tokenize(req: dict) -> list[list[int]]:
    llm = load_llama(req["gguf"], vocab_only=True)
    return [llm.tokenize(t.encode("utf-8"), add_bos=req["add_special"], special=req["parse_special"])
            for t in req["texts"]]


def _op_render_chat(req: dict) -> list[dict]:
    llm = load_llama(req["gguf"], vocab_only=True)
    renderer = _renderer(llm, req["gguf"], req.get("reasoning", "auto"))
    out = []
    for messages in req["conversations"]:
        text, _ = renderer.render(messages, tools=req.get("tools"), add_generation_prompt=req["add_generation_prompt"])
        out.append({"text": text, "ids": renderer.tokenize(text)})
    return out


def _op_chat(req: dict) -> list[dict]:
    from finetune.gguf.worker import Generator

    gen = Generator(req["gguf"], n_ctx=req["n_ctx"], threads=req["threads"], lora_path=req["lora_path"],
                    seed=req["seed"], reasoning=req.get("reasoning", "auto"))
    params = {"temperature": req["temperature"], "top_k": 0 if req["temperature"] == 0 else 40, "seed": req["seed"]}
    out = []
    for messages in req["conversations"]:
        # llama-cpp-python keeps the KV cache of the longest prefix shared with the previous prompt (the template's
        # system prompt and turn markers), so only the rest is evaluated
        started = time.perf_counter()
        _, ids, stop, max_tokens, _ = gen.prepare({"mode": "chat", "messages": messages, "tools": req.get("tools"),
                                                   "max_tokens": req["max_tokens"]})
        # the text as llama.cpp's completion gives it (without special tokens); the last step says how it ended
        steps = list(gen.sample(ids, params, max_tokens=max_tokens, stop=stop, grammar=None, special=False))
        out.append({"text": "".join(piece for piece, _, _ in steps), "finish_reason": steps[-1][1],
                    "tokens": steps[-1][2], "prompt_tokens": len(ids), "seconds": time.perf_counter() - started})
    return out


def _op_compare_logits(req: dict) -> dict:
    import numpy as np

    seqs = req["sequences"]
    ref = np.load(req["reference"], mmap_mode="r")
    n_ctx = max(len(s) for s in seqs) + 8
    llm = load_llama(req["gguf"], n_ctx=n_ctx, logits_all=True, lora_path=req["lora_path"], threads=req["threads"])
    agree = total = decisive = decisive_agree = 0
    kl_sum = nll_ref = nll_gguf = 0.0
    row = 0
    for seq in seqs:
        llm.reset()
        llm.eval(seq)
        got = np.asarray(llm.scores[: len(seq)], dtype=np.float64)
        want = np.asarray(ref[row: row + len(seq)], dtype=np.float64)
        row += len(seq)
        lp_got = got - _logsumexp(got)
        lp_want = want - _logsumexp(want)
        # Position i predicts token i+1: compare all but the last position.
        targets = np.asarray(seq[1:])
        lp_got, lp_want = lp_got[:-1], lp_want[:-1]
        same = lp_got.argmax(-1) == lp_want.argmax(-1)
        agree += int(same.sum())
        total += len(targets)
        # Where the reference's two best tokens are nearly tied, rounding alone may swap them: count agreement
        # also over the positions where the reference prefers its top token by a margin.
        top2 = np.exp(np.sort(lp_want, axis=-1)[:, -2:])
        clear = (top2[:, 1] - top2[:, 0]) >= DECISIVE_MARGIN
        decisive += int(clear.sum())
        decisive_agree += int((same & clear).sum())
        kl_sum += float((np.exp(lp_want) * (lp_want - lp_got)).sum())
        idx = np.arange(len(targets))
        nll_ref -= float(lp_want[idx, targets].sum())
        nll_gguf -= float(lp_got[idx, targets].sum())
    return {
        "positions": total,
        "top1_agreement": agree / total if total else None,
        "decisive_positions": decisive,
        "top1_agreement_decisive": decisive_agree / decisive if decisive else None,
        "kl_mean": kl_sum / total if total else None,
        "ppl_reference": float(np.exp(nll_ref / total)) if total else None,
        "ppl_gguf": float(np.exp(nll_gguf / total)) if total else None,
    }


def _op_reply_logprobs(req: dict) -> list[dict]:
    import numpy as np

    vocab = load_llama(req["gguf"], vocab_only=True)
    renderer = _renderer(vocab, req["gguf"])
    eog = set(renderer.stop_ids)
    sequences = []
    for messages, reply in zip(req["conversations"], req["replies"], strict=True):
        prompt, _ = renderer.render(messages)
        whole, _ = renderer.render([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        if not whole.startswith(prompt):
            raise UserError(f"{req['gguf']}: the chat template renders a reply that does not extend its prompt, so "
                            "the reply cannot be scored on its own")
        # the prompt as the server tokenizes it, then the reply as generated: its tokens up to the end of the turn
        rest = vocab.tokenize(whole[len(prompt):].encode("utf-8"), add_bos=False, special=True)
        end = next((i + 1 for i, t in enumerate(rest) if t in eog), len(rest))
        sequences.append((renderer.tokenize(prompt), rest[:end]))
    llm = load_llama(req["gguf"], n_ctx=max(len(p) + len(r) for p, r in sequences) + 8, logits_all=True,
                     threads=req["threads"])
    out = []
    for prompt_ids, reply_ids in sequences:
        llm.reset()
        llm.eval(prompt_ids + reply_ids)
        # position i predicts token i + 1: the reply's tokens are predicted from the prompt's last position on
        logits = np.asarray(llm.scores[len(prompt_ids) - 1: len(prompt_ids) + len(reply_ids) - 1], dtype=np.float64)
        logprobs = (logits - _logsumexp(logits))[np.arange(len(reply_ids)), reply_ids]
        out.append({"logprob": float(logprobs.sum()), "ids": reply_ids, "token_logprobs": logprobs.tolist()})
    return out


def _logsumexp(x):
    import numpy as np

    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _op_quantize(req: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = req["ftype"]
    params.nthread = hardware.threads(req["threads"])
    keep_alive = []
    if req.get("imatrix"):
        from finetune.gguf import imatrix

        params.imatrix, keep_alive = imatrix.quantize_param(Path(req["imatrix"]))
    dst = Path(req["dst"])
    tmp = dst.with_name(f".{dst.name}.tmp")
    rc = llama_cpp.llama_model_quantize(req["gguf"].encode(), str(tmp).encode(), params)
    del keep_alive
    if rc != 0:
        tmp.unlink(missing_ok=True)
        return {"error": f"llama_model_quantize({dst.name}) returned {rc}"}
    os.replace(tmp, dst)
    return {"size": dst.stat().st_size}


def _op_many(req: dict) -> list[dict]:
    out = []
    for job in req["jobs"]:
        try:
            result = _OPS[job["op"]]({**job, "gguf": req["gguf"]})
            out.append({"result": result})
        except UserError as exc:
            out.append({"error": str(exc)})
        except Exception as exc:  # one job's Python error (a template raising on a message) fails that job only
            out.append({"error": f"{job['op']}: {type(exc).__name__}: {exc}"})
    return out


_BATCHABLE = {"inspect": inspect, "tokenize": tokenize, "render_chat": render_chat, "chat": chat,
              "compare_logits": compare_logits, "reply_logprobs": reply_logprobs}
_OPS = {"inspect": _op_inspect, "tokenize": _op_tokenize, "render_chat": _op_render_chat, "chat": _op_chat,
        "compare_logits": _op_compare_logits, "reply_logprobs": _op_reply_logprobs, "quantize": _op_quantize,
        "many": _op_many}


def run_job(req: dict) -> dict:
    """One job in the worker process (finetune.gguf.worker): {"result": ...} or {"error": message}."""
    try:
        result = _OPS[req["op"]](req)
    except UserError as exc:
        return {"error": str(exc)}
    return {"error": result["error"]} if isinstance(result, dict) and "error" in result else {"result": result}
