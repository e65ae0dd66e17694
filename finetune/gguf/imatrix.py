"""Importance matrix for quantization, computed from the user's own data.

llama.cpp quantizes a weight row better when it knows which input columns matter: the mean squared activation
reaching each input column of each matrix product (its ``imatrix`` tool measures it by running the model on
calibration text). Here the fine-tuned model itself is run in transformers on the recipe's training split (the best
calibration text there is: exactly what the model will see), with a forward hook on every linear layer:

    importance[name][j] = sum over tokens of x[token, j]^2 / tokens

HF module names are mapped to GGUF tensor names with the tensor-name table of llama.cpp's own ``gguf-py`` (the same
table its converter used to name the tensors; run in a child process, like the converter), each entry is checked
against the shape of the tensor in the F16 GGUF, and the result is written in llama.cpp's imatrix GGUF format
(``<tensor>.in_sum2`` and ``<tensor>.counts``, ``general.type = imatrix``), so llama.cpp's own tools can reuse it.
``finetune.gguf.runtime.quantize(..., imatrix=path)`` passes it to ``llama_model_quantize``.

Layers that are not ``nn.Linear`` (fused expert tensors of mixture-of-experts models) get no entry: llama.cpp
quantizes them without one, and the types that cannot do without (IQ1/IQ2/IQ3_XXS) then fail with its message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from finetune import hardware
from finetune.errors import UserError


@dataclass
class Importance:
    sums: dict[str, list[float]]   # HF module name -> sum of squared inputs per input column
    tokens: int                    # tokens the model saw
    chunks: int                    # forward passes (chunks of ``chunk`` tokens)
    chunk: int


def collect(model_dir: Path, sequences: list[list[int]], *, chunk: int = 512, max_tokens: int = 16384,
            threads: int | None = None) -> Importance:
    """Run the checkpoint in ``model_dir`` over the token sequences (concatenated and cut into chunks of ``chunk``
    tokens, as llama.cpp's imatrix tool does with text) and sum the squared inputs of every linear layer."""
    import torch

    from finetune import models

    stream = [t for seq in sequences for t in seq][:max_tokens]
    if len(stream) < 2:
        raise UserError("export.imatrix: the calibration data has no tokens; check data.sources or export.imatrix_files")
    # bf16 where the device computes it fast; the squares are summed in fp32
    device = hardware.device()
    model = models.load_causal_lm(model_dir, dtype=hardware.torch_dtype("auto", device)).to(device)
    model.config.use_cache = False
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums[name] + (x * x).sum(0) if name in sums else (x * x).sum(0)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            n = 0
            for start in range(0, len(stream), chunk):
                ids = stream[start:start + chunk]
                model(input_ids=torch.tensor([ids], device=device))
                n += 1
    finally:
        for h in hooks:
            h.remove()
        torch.set_num_threads(before)
    return Importance({k: v.tolist() for k, v in sums.items()}, len(stream), n, chunk)


def write(importance: Importance, *, gguf_model: Path, out_file: Path, datasets: list[str]) -> dict:
    """Map to the GGUF's tensor names, check sizes against ``gguf_model`` and write llama.cpp's imatrix GGUF.

    Returns {"entries": n, "unmapped": [HF names without a GGUF tensor], "tokens", "chunks"}."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    reader = GGUFReader(str(gguf_model))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    blocks_field = reader.fields.get(f"{arch}.block_count")
    n_blocks = int(blocks_field.parts[-1][0]) if blocks_field else 0
    columns = {t.name: int(t.shape[0]) for t in reader.tensors}  # GGUF shapes list the row length first
    names = _gguf_names(arch, n_blocks, list(importance.sums))
    writer_tmp = out_file.with_name(f".{out_file.name}.tmp")
    writer = GGUFWriter(str(writer_tmp), arch="imatrix", use_temp_file=False)
    # The imatrix format is a GGUF without an architecture: general.type says what it is.
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", datasets)
    writer.add_uint32("imatrix.chunk_count", importance.chunks)
    writer.add_uint32("imatrix.chunk_size", importance.chunk)
    unmapped, entries = [], 0
    for hf_name, values in importance.sums.items():
        name = names.get(hf_name)
        if name is None or columns.get(f"{name}.weight") != len(values):
            unmapped.append(hf_name)
            continue
        entries += 1
        writer.add_tensor(f"{name}.weight.in_sum2", np.asarray([values], dtype=np.float32),
                          raw_dtype=GGMLQuantizationType.F32)
        writer.add_tensor(f"{name}.weight.counts", np.asarray([[float(importance.tokens)]], dtype=np.float32),
                          raw_dtype=GGMLQuantizationType.F32)
    if entries == 0:
        writer.close()
        writer_tmp.unlink(missing_ok=True)
        raise UserError(f"export.imatrix: no linear layer of the model matched a tensor of {gguf_model.name} "
                        f"(architecture {arch}); set export.imatrix: false")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(writer_tmp, out_file)
    return {"entries": entries, "unmapped": unmapped, "tokens": importance.tokens, "chunks": importance.chunks}


def load(path: Path) -> dict[str, list[float]]:
    """An imatrix GGUF (ours or llama.cpp's) as {tensor name: mean squared activation per column}, the form
    ``llama_model_quantize`` takes."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    general_type = reader.fields.get("general.type")
    if general_type is None or bytes(general_type.parts[-1]).decode() != "imatrix":
        raise UserError(f"{path}: not an importance-matrix GGUF (general.type is not 'imatrix')")
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key.removesuffix(".in_sum2")
        counts = tensors.get(f"{name}.counts")
        if counts is None:
            continue
        sums = sums.reshape(counts.size, -1)
        counts = counts.reshape(-1, 1)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
        out[name] = means.reshape(-1).astype(np.float32).tolist()
    return out


def quantize_param(path: Path):
    """``load(path)`` as llama_model_quantize_params.imatrix: a NULL-terminated C array of {name, data, size}, and
    the Python objects that own its memory (they must outlive the quantize call). Only in the llama.cpp process."""
    import ctypes

    import llama_cpp

    entries = load(path)
    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    owners = [array]
    for i, (name, values) in enumerate(entries.items()):
        buf = (ctypes.c_float * len(values))(*values)
        encoded = name.encode()
        owners += [buf, encoded]
        array[i].name = encoded
        array[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
        array[i].size = len(values)
    array[len(entries)].name = None
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), owners


# The converter's gguf-py (the same release as the runtime) knows every architecture's tensor names; it runs in a
# child process so that its ``gguf`` package never meets the registry one imported here.
_MAP_SCRIPT = """
import json, sys
import gguf
arch_name, n_blocks, names, out = sys.argv[1], int(sys.argv[2]), json.loads(open(sys.argv[3]).read()), sys.argv[4]
arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
result = {}
if arch is not None:
    table = gguf.get_tensor_name_map(arch, n_blocks)
    for name in names:
        mapped = table.get_name(name)
        if mapped is not None:
            result[name] = mapped
open(out, "w").write(json.dumps(result))
"""


def _gguf_names(arch: str, n_blocks: int, hf_names: list[str]) -> dict[str, str]:
    from finetune.gguf import sdist

    src = sdist.llama_cpp_dir()
    with tempfile.TemporaryDirectory(prefix="finetune-imatrix-") as tmp:
        names_file, out_file = Path(tmp) / "names.json", Path(tmp) / "mapped.json"
        names_file.write_text(json.dumps(hf_names))
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        proc = subprocess.run([sys.executable, "-c", _MAP_SCRIPT, arch, str(n_blocks), str(names_file), str(out_file)],
                              capture_output=True, text=True, env=env, errors="replace")
        if proc.returncode != 0:
            raise UserError(f"export.imatrix: mapping tensor names failed: {proc.stderr.strip()[-400:]}")
        return json.loads(out_file.read_text())


def from_calibration(tokenizer, merged_dir: Path, f16: Path, out_file: Path, calibration, log) -> dict:
    """The importance matrix of ``merged_dir`` measured on ``calibration``'s rows (chat rows through the chat template,
    text rows as text), written to ``out_file`` with the tensor names of the GGUF ``f16``."""
    sequences = []
    for row in calibration.rows:
        if row.get("messages"):
            sequences.append(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        elif row.get("text"):
            sequences.append(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
    log(f"export: importance matrix from {', '.join(calibration.sources)} (up to {calibration.max_tokens} tokens)")
    importance = collect(merged_dir, sequences, max_tokens=calibration.max_tokens)
    info = write(importance, gguf_model=f16, out_file=out_file, datasets=calibration.sources)
    info["unmapped"] = info["unmapped"][:20]
    return info
