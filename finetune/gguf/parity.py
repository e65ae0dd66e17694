"""Parity checks: does the GGUF behave like the Hugging Face checkpoint it came from?

Each check compares the HF side (computed here, with transformers) with llama.cpp (run through
``finetune.gguf.runtime`` in a child process, so a native crash becomes a failed check, not a dead export):

- metadata: architecture, chat template identical to the HF one, BOS/EOS ids, add_bos;
- end of turn: every token that ends an assistant turn in the chat template is an end-of-generation token;
- tokenization of varied strings (ASCII, whitespace, digits, emoji, CJK, special tokens);
- chat prompt: HF ``apply_chat_template`` ids == llama.cpp's Jinja path ids, with at most one leading BOS;
- logits, teacher-forced on held-out text: top-1 agreement, KL, perplexity, with thresholds per type;
- greedy chat on the unquantized GGUF stops by itself (finish_reason "stop").

Failures name what differs and what to do. A check never raises: it returns {"ok": False, ...}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from finetune import models
from finetune.errors import UserError
from finetune.gguf import runtime

TOKENIZATION_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "    def f(x):\n        return x ** 2  # indented code",
    "1234567890 3.14159 -42 1e-5 2024-06-01 12:30",
    "12345678901234567890",
    "Emoji: 😀👍🏽🎉 and ❤️ and 🇫🇷",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "Ünïcödé àccents: café, naïve, Straße, Ελληνικά, Русский",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
    '{"json": [1, 2, {"k": "v"}], "null": null}',
    "   ",
    "a",
]

# Minimum teacher-forced top-1 agreement with the HF model, per GGUF type. Small models lose far more to
# quantization than large ones (SmolLM2-135M: Q8_0 0.89, Q4_K_M 0.75 measured), so the bar depends on size.
_QUANT_TOP1 = {
    #          < 1B params, >= 1B params
    "Q8_0":   (0.80, 0.95),
    "Q6_K":   (0.75, 0.93),
    "Q5_K_M": (0.70, 0.90),
    "Q5_K_S": (0.70, 0.90),
    "Q5_0":   (0.70, 0.90),
    "Q4_K_M": (0.62, 0.85),
    "Q4_K_S": (0.60, 0.85),
    "Q4_0":   (0.55, 0.80),
}
ADAPTER_MIN_TOP1 = 0.97


def top1_threshold(qtype: str, n_params: int, min_top1_unquantized: float) -> float:
    if qtype in ("F32", "F16", "BF16"):
        return min_top1_unquantized
    small, large = _QUANT_TOP1.get(qtype, (0.5, 0.8))
    return small if n_params < 1_000_000_000 else large


# ------------------------------------------------------------------------------------------- HF side
def default_system_prompt(tokenizer) -> str | None:
    """The system text the chat template inserts when a conversation has no system message (None if it inserts none,
    or refuses system messages: Gemma 2 raises "System role not supported")."""
    probe = "PROBE-system-text"
    try:
        with_sys = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "Hi"}], tokenize=False)
    except Exception:  # jinja2 TemplateError or the template's raise_exception (ValueError)
        return None
    without = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    start = with_sys.find(probe)
    if start < 0:
        return None
    # with a system message: PREFIX probe AFTER; without one, a template with a default renders PREFIX default AFTER.
    prefix, after = with_sys[:start], with_sys[start + len(probe):]
    if without.startswith(prefix) and without.endswith(after) and len(without) > len(prefix) + len(after):
        return without[len(prefix): len(without) - len(after)]
    return None


def hf_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def accepted_messages(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[dict] | None:
    """``messages`` as the chat template accepts them: a template that refuses system messages (Gemma 2 raises
    "System role not supported") gets them without; None when neither renders."""
    for candidate in (messages, [m for m in messages if m["role"] != "system"]):
        try:
            tokenizer.apply_chat_template(candidate, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception:  # jinja2 TemplateError or the template's raise_exception (ValueError)
            continue
        return candidate
    return None


def heldout_sequences(tokenizer, rows: list[dict], *, max_sequences: int = 8, max_tokens: int = 256) -> list[list[int]]:
    """Token ids of held-out rows (chat rows through the template, text rows as text), truncated."""
    seqs: list[list[int]] = []
    for row in rows:
        if "messages" in row:
            messages = accepted_messages(tokenizer, row["messages"], add_generation_prompt=False) or row["messages"]
            ids = hf_ids(tokenizer, messages, add_generation_prompt=False)
        else:
            ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"]
        ids = ids[:max_tokens]
        if len(ids) >= 8:
            seqs.append(ids)
        if len(seqs) >= max_sequences:
            break
    return seqs


FALLBACK_HELDOUT = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Give me three colours."},
                  {"role": "assistant", "content": "Red, green and blue."}]},
    {"text": "The water cycle describes how water evaporates from the surface of the earth, rises into the "
             "atmosphere, cools and condenses into clouds, and falls again to the surface as precipitation."},
    {"text": "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"},
]


class HFReference:
    """The HF model the GGUFs are compared with, loaded once in float32."""

    def __init__(self, model_dir: Path, tokenizer):
        import torch

        from finetune import models

        self.tokenizer = tokenizer
        self.model = models.load_causal_lm(model_dir, dtype=torch.float32, use_safetensors=True)
        self.model.eval()

    def _logits(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def save_logits(self, sequences: list[list[int]], out_file: Path) -> Path:
        """Logits for every position of every sequence, concatenated, as a float32 .npy (read by the child)."""
        import numpy as np

        np.save(out_file, np.concatenate([self._logits(seq) for seq in sequences], axis=0))
        return out_file

    def follow(self, messages: list[dict], answer: str, eot_ids: list[int]) -> dict:
        """Teacher-force a GGUF answer through HF: how long HF agrees with it, and where HF would have stopped.

        One forward pass instead of HF generate(): the GGUF's greedy path is checked token by token.
        """
        import numpy as np

        prompt = hf_ids(self.tokenizer, messages, add_generation_prompt=True)
        ans = self.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        logits = self._logits(prompt + ans)
        preds = logits[len(prompt) - 1:].argmax(-1).tolist()  # preds[i]: HF's greedy choice for answer token i
        agree = 0
        while agree < len(ans) and preds[agree] == ans[agree]:
            agree += 1
        # HF's choice at the first point of disagreement (or right after the answer): the end of turn?
        hf_stops_at = margin = None
        if agree < len(preds) and preds[agree] in eot_ids:
            row = logits[len(prompt) - 1 + agree]
            p = np.exp(row - row.max())
            p /= p.sum()
            # How sure HF is of ending there, over the token llama.cpp chose: a near tie is no evidence of a bug.
            margin = float(p[preds[agree]] - (p[ans[agree]] if agree < len(ans) else 0.0))
            hf_stops_at = agree if margin > 0.1 else None
        return {"answer_tokens": len(ans), "agree_tokens": agree, "hf_stops_at": hf_stops_at, "hf_stop_margin": margin,
                "answer_has_end_of_turn": any(t in eot_ids for t in ans)}


# -------------------------------------------------------------------------------------------- checks
def check_metadata(info: dict, tokenizer, model_type: str | None = None) -> dict:
    hf_template = tokenizer.chat_template
    problems = []
    if not info["chat_template"]:
        problems.append("the GGUF has no tokenizer.chat_template: llama-cpp-python would silently use llama-2 format")
    elif info["chat_template"] != hf_template:
        problems.append("the GGUF's chat template differs from the HF tokenizer's")
    hf_bos = tokenizer.bos_token_id
    if hf_bos is not None and info["bos_id"] != hf_bos:
        problems.append(f"BOS id: GGUF {info['bos_id']} ({info['bos_text']!r}) vs HF {hf_bos} ({tokenizer.bos_token!r})")
    if info["eos_id"] != tokenizer.eos_token_id:
        problems.append(f"EOS id: GGUF {info['eos_id']} ({info['eos_text']!r}) vs HF {tokenizer.eos_token_id} "
                        f"({tokenizer.eos_token!r})")
    hf_add_bos = _hf_adds_bos(tokenizer)
    if info["add_bos"] != hf_add_bos:
        problems.append(f"add_bos: GGUF {info['add_bos']} vs HF {hf_add_bos} (one of them would double or drop the BOS)")
    if model_type and info["architecture"] != model_type:
        problems.append(f"architecture: GGUF {info['architecture']!r}, expected {model_type!r}")
    out = {"ok": not problems, "problems": problems, "architecture": info["architecture"],
           "bos_id": info["bos_id"], "eos_id": info["eos_id"], "add_bos": info["add_bos"],
           "eog_ids": info["eog_ids"], "eog_texts": info["eog_texts"], "n_ctx_train": info["n_ctx_train"],
           "chat_template_equal": info["chat_template"] == hf_template}
    if problems:
        out["error"] = "; ".join(problems)
    return out


def _hf_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def check_end_of_turn(info: dict, tokenizer, eot_ids: list[int]) -> dict:
    missing = [i for i in eot_ids if i not in info["eog_ids"]]
    names = {i: tokenizer.convert_ids_to_tokens(i) for i in eot_ids}
    out = {"end_of_turn": [{"id": i, "token": names[i]} for i in eot_ids], "eog_ids": info["eog_ids"],
           "ok": not missing}
    if missing:
        out["error"] = (
            f"end-of-turn token(s) {[names[i] for i in missing]} (ids {missing}) are not end-of-generation tokens in "
            f"llama.cpp (its EOG set: {info['eog_texts']}): generation would run to max_tokens. Make the end-of-turn "
            "token the tokenizer's eos_token (finetune export does this in export/merged/) and export again."
        )
    return out


def tokenization_cases(tokenizer) -> list[str]:
    cases = list(TOKENIZATION_CASES)
    specials = [t for t in tokenizer.all_special_tokens if t][:4]
    if specials:
        cases.append(f"{specials[0]}special{specials[-1]} text {specials[0]}")
    return cases


def check_tokenization(tokenizer, cases: list[str], got: list[list[int]], got_with_special: list[list[int]]) -> dict:
    """got: llama.cpp ids without added specials; got_with_special: ids of cases[:len(got_with_special)] with them."""
    mismatches = []
    for text, ids in zip(cases, got, strict=True):
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != want:
            mismatches.append({"text": text, "hf": want, "gguf": ids})
    for text, ids in zip(cases, got_with_special, strict=False):
        want = tokenizer(text, add_special_tokens=True)["input_ids"]
        if ids != want:
            mismatches.append({"text": text, "add_special": True, "hf": want, "gguf": ids})
    out = {"ok": not mismatches, "cases": len(got) + len(got_with_special), "mismatches": mismatches[:5]}
    if mismatches:
        out["error"] = (f"{len(mismatches)} string(s) tokenize differently in llama.cpp (first: "
                        f"{mismatches[0]['text']!r}); the GGUF's pre-tokenizer does not match the model's")
    return out


def check_chat_prompt(tokenizer, conversations: list[list[dict]], rendered: list[dict]) -> dict:
    mismatches = []
    bos = tokenizer.bos_token_id
    double_bos = 0
    for messages, got in zip(conversations, rendered, strict=True):
        want = hf_ids(tokenizer, messages, add_generation_prompt=True)
        if got["ids"] != want:
            mismatches.append({"messages": messages, "hf": want[:40], "gguf": got["ids"][:40]})
        ids = got["ids"]
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            double_bos += 1
    problems = []
    if mismatches:
        problems.append(f"{len(mismatches)} of {len(conversations)} chat prompts differ between HF apply_chat_template "
                        "and llama.cpp's Jinja path")
    if double_bos:
        problems.append(f"{double_bos} prompt(s) start with two BOS tokens (template bos_token + add_bos)")
    out = {"ok": not problems, "conversations": len(conversations), "mismatches": mismatches[:3], "double_bos": double_bos}
    if problems:
        out["error"] = "; ".join(problems)
    return out


# Top-1 agreement is judged over the "decisive" positions (the HF model's top token ahead of its second by
# runtime.DECISIVE_MARGIN in probability) when there are at least this many: at a near tie, float rounding alone
# may swap the two best tokens, which says nothing about the export (small and freshly trained models have many).
MIN_DECISIVE_POSITIONS = 16


def judged_top1(m: dict) -> tuple[float | None, str]:
    """The agreement the threshold applies to, and over which positions it was counted."""
    if m.get("top1_agreement_decisive") is not None and (m.get("decisive_positions") or 0) >= MIN_DECISIVE_POSITIONS:
        return m["top1_agreement_decisive"], f"{m['decisive_positions']} decisive positions of {m['positions']}"
    return m["top1_agreement"], f"all {m['positions']} positions"


def check_logits(m: dict, *, min_top1: float) -> dict:
    top1, over = judged_top1(m)
    ok = top1 is not None and top1 >= min_top1 and math.isfinite(m["ppl_gguf"])
    out = {**m, "min_top1": min_top1, "judged_top1": top1, "judged_over": over, "ok": ok}
    if not ok:
        out["error"] = (f"teacher-forced top-1 agreement with the HF model is {top1:.3f} over {over} "
                        f"(all positions: {m['top1_agreement']:.3f}), below {min_top1:.3f} (KL {m['kl_mean']:.4f}, "
                        f"perplexity HF {m['ppl_reference']:.2f} vs GGUF {m['ppl_gguf']:.2f}): the GGUF does not "
                        "compute what the trained model computes")
    return out


def check_greedy_stop(gguf_answers: list[dict], follows: list[dict], max_tokens: int) -> dict:
    """Greedy answers on the unquantized GGUF must stop by themselves (finish_reason "stop").

    A small model may ramble on some prompt in HF too; that says nothing about the export. An answer counts
    against the GGUF when it did not stop although (a) it contains the end-of-turn token as text, or (b) HF,
    following the same tokens, would have ended the turn right where llama.cpp went on.
    """
    rows, broken = [], 0
    for gg, fo in zip(gguf_answers, follows, strict=True):
        stopped = gg["finish_reason"] == "stop"
        bad = not stopped and (fo["answer_has_end_of_turn"] or fo["hf_stops_at"] is not None)
        broken += bad
        rows.append({"text": gg["text"][:300], "finish_reason": gg["finish_reason"], "tokens": gg["tokens"], **fo})
    stops = sum(g["finish_reason"] == "stop" for g in gguf_answers)
    out = {"ok": broken == 0, "answers": rows, "gguf_stopped": stops, "max_tokens": max_tokens}
    if broken:
        out["error"] = (f"{broken} greedy answer(s) ran on to {max_tokens} tokens where the HF model ends the turn: "
                        "the end-of-turn token does not end generation in llama.cpp")
    elif stops < len(rows):
        out["note"] = (f"{len(rows) - stops} answer(s) did not stop, but the HF model does not end the turn there "
                       "either (the model itself rambles on that prompt)")
    return out


def _guard(name: str, fn, *args, **kwargs) -> dict:
    """A check's result; a failure to run it (crash, error) is a failed check, never an exception."""
    try:
        result = fn(*args, **kwargs)
    except UserError as exc:  # RuntimeCrash included
        return {"check": name, "ok": False, "error": str(exc)}
    return {"check": name, **result}


def _result(item: dict):
    if "error" in item:
        raise UserError(item["error"])
    return item["result"]


def run_checks(*, model_dir: Path, ggufs: dict[str, Path], tokenizer, sequences: list[list[int]],
               conversations: list[list[dict]], greedy_conversations: list[list[dict]], reference: Path,
               hf: HFReference, n_params: int, min_top1_unquantized: float, unquantized: str,
               adapter: tuple[Path, Path] | None = None, greedy_max_tokens: int = 256,
               architecture: str | None = None) -> dict[str, Any]:
    """All checks; returns the parity report (``report["ok"]`` is False when any check failed).

    llama.cpp work runs in one child process per GGUF (``runtime.run_many``); a crash fails that GGUF's checks.
    """
    report: dict[str, Any] = {"model": str(model_dir), "n_params": n_params, "types": {}}
    base = ggufs[unquantized]
    cases = tokenization_cases(tokenizer)
    try:
        res = runtime.run_many(base, [
            ("inspect", {}),
            ("tokenize", {"texts": cases, "add_special": False}),
            ("tokenize", {"texts": cases[:3], "add_special": True}),
            ("render_chat", {"conversations": conversations}),
            ("compare_logits", {"sequences": sequences, "reference_logits": reference}),
            ("chat", {"conversations": greedy_conversations, "max_tokens": greedy_max_tokens}),
        ])
    except UserError as exc:
        res = [{"error": f"llama.cpp failed on {base.name}: {exc}"}] * 6
    eot: list[int] = []
    try:
        eot = models.end_of_turn_ids(tokenizer)
    except UserError as exc:
        report["end_of_turn"] = {"check": "end_of_turn", "ok": False, "error": str(exc)}
    else:
        report["end_of_turn"] = _guard("end_of_turn", lambda: check_end_of_turn(_result(res[0]), tokenizer, eot))
    report["metadata"] = _guard("metadata", lambda: check_metadata(_result(res[0]), tokenizer, architecture))
    report["tokenization"] = _guard("tokenization", lambda: check_tokenization(
        tokenizer, cases, _result(res[1]), _result(res[2])))
    report["chat_prompt"] = _guard("chat_prompt", lambda: check_chat_prompt(tokenizer, conversations, _result(res[3])))
    def greedy() -> dict:
        answers = _result(res[5])
        follows = [hf.follow(m, a["text"], eot) for m, a in zip(greedy_conversations, answers, strict=True)]
        return check_greedy_stop(answers, follows, greedy_max_tokens)

    report["greedy_chat"] = _guard("greedy_chat", greedy)
    for qtype, path in ggufs.items():
        threshold = top1_threshold(qtype, n_params, min_top1_unquantized)
        if path == base:
            logits = _guard("logits", lambda t=threshold: check_logits(_result(res[4]), min_top1=t))
        else:
            logits = _guard("logits", lambda p=path, t=threshold: check_logits(
                runtime.compare_logits(p, sequences, reference), min_top1=t))
        report["types"][qtype] = {"file": path.name, "size_bytes": path.stat().st_size, "logits": logits}
    if adapter is not None:
        base_gguf, adapter_gguf = adapter
        report["adapter"] = _guard("adapter_logits", lambda: {
            "base": base_gguf.name, "adapter": adapter_gguf.name,
            **check_logits(runtime.compare_logits(base_gguf, sequences, reference, lora_path=adapter_gguf),
                           min_top1=ADAPTER_MIN_TOP1)})
    failed = failed_checks(report)
    report["ok"] = not failed
    report["failed"] = failed
    return report


def failed_checks(report: dict) -> list[str]:
    out = []
    for key in ("end_of_turn", "metadata", "tokenization", "chat_prompt", "adapter", "greedy_chat"):
        item = report.get(key)
        if item is not None and not item.get("ok"):
            out.append(f"{key}: {item.get('error') or 'failed'}")
    for qtype, item in report.get("types", {}).items():
        if not item["logits"].get("ok"):
            out.append(f"logits {qtype}: {item['logits'].get('error', 'failed')}")
    return out
