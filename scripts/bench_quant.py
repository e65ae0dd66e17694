"""Quantization with vs without an importance matrix, measured against the transformers model, in one run.

    python scripts/bench_quant.py                                   # embedded SmolLM2-135M, quickstart data
    python scripts/bench_quant.py --model DIR --data FILE.jsonl --types Q4_K_M,Q4_0,IQ4_XS,Q3_K_M

The model is converted to F16 with llama.cpp's converter; the importance matrix is measured (finetune.gguf.imatrix)
on the first --calibration conversations of the data file, rendered with the model's chat template; each type is
quantized twice (plain, and with the matrix) and scored teacher-forced on the --heldout conversations that follow
(never seen by the calibration): top-1 agreement, KL divergence and perplexity against the transformers model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def conversations(path: Path) -> list[list[dict]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the quickstart file has planted defects
        msgs = row.get("messages") if isinstance(row, dict) else None
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and m.get("content") for m in msgs):
            out.append(msgs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", type=Path, default=REPO / "recipes" / "data" / "quickstart.jsonl")
    p.add_argument("--types", default="Q4_K_M,Q4_0,IQ4_XS,Q3_K_M")
    p.add_argument("--calibration", type=int, default=400, help="conversations the matrix is measured on")
    p.add_argument("--heldout", type=int, default=40, help="conversations the GGUFs are scored on")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    ns = p.parse_args()

    from transformers import AutoTokenizer

    from finetune import models
    from finetune.gguf import convert, imatrix, parity, runtime

    model_dir = Path(ns.model) if ns.model else models.resolve(models.EMBEDDED_MODEL).path
    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = conversations(ns.data)
    calib, held = convs[:ns.calibration], convs[ns.calibration:ns.calibration + ns.heldout]
    if not held:
        sys.exit(f"{ns.data}: {len(convs)} conversations, none left for --heldout after --calibration")

    def ids(c):
        return tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]

    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        tmp = Path(tmp)
        f16 = convert.convert_model(model_dir, tmp / "m-F16.gguf", "F16")
        t0 = time.time()
        importance = imatrix.collect(model_dir, [ids(c) for c in calib], max_tokens=ns.tokens)
        info = imatrix.write(importance, gguf_model=f16, out_file=tmp / "imatrix.gguf", datasets=[ns.data.name])
        print(f"importance matrix: {info['entries']} tensors, {info['tokens']} tokens, {time.time() - t0:.0f} s")
        sequences = [ids(c) for c in held]
        ref = tmp / "ref.npy"
        parity.HFReference(model_dir, tok).save_logits(sequences, ref)
        print("| type | size (MiB) | top-1 without / with | KL without / with | perplexity without / with (model) |")
        print("|---|---|---|---|---|")
        for qtype in ns.types.split(","):
            got = {}
            for label, matrix in (("plain", None), ("imatrix", tmp / "imatrix.gguf")):
                out = tmp / f"m-{qtype}-{label}.gguf"
                runtime.quantize(f16, out, qtype, imatrix=matrix)
                got[label] = {**runtime.compare_logits(out, sequences, ref), "mib": out.stat().st_size / 2**20}
                out.unlink()
            a, b = got["plain"], got["imatrix"]
            print(f"| {qtype} | {a['mib']:.0f} / {b['mib']:.0f} | {a['top1_agreement']:.3f} / "
                  f"{b['top1_agreement']:.3f} | {a['kl_mean']:.3f} / {b['kl_mean']:.3f} | {a['ppl_gguf']:.2f} / "
                  f"{b['ppl_gguf']:.2f} ({a['ppl_reference']:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
