"""Hugging Face checkpoint -> GGUF with llama.cpp's own converter, in a child process.

The converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion/`` package and
``gguf-py``) comes from the sdist of the installed llama-cpp-python (``finetune.gguf.sdist``), so architecture
and pre-tokenizer names match the runtime. It runs as a child process with PYTHONPATH pointing at that tree's
``gguf-py``: its ``gguf`` package must not meet the registry ``gguf`` that transformers imports in this process.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from finetune.errors import UserError
from finetune.gguf import sdist

# Approximate bits per weight of each type, for the free-disk check before converting.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q5_0": 5.5,
    "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0,
}

# Converter failures that have a known cause, mapped to what the user can do about them.
_KNOWN_FAILURES = [
    ("BPE pre-tokenizer was not recognized",
     "llama.cpp does not know this model's pre-tokenizer (its tokenizer.json pre-tokenization). A GGUF made anyway "
     "would tokenize differently from the trained model; use a model family llama.cpp supports"),
    ("is not supported", "llama.cpp's converter does not support this architecture"),
    ("No module named 'sentencepiece'", "the converter needs sentencepiece: pip install sentencepiece"),
]


def supported_architectures() -> set[str]:
    """Hugging Face architecture names (config.json 'architectures') that the bundled converter knows."""
    return set(_text_model_map(str(sdist.llama_cpp_dir())))


@lru_cache(maxsize=2)
def _text_model_map(src: str) -> dict[str, str]:
    # Read the table from the source text: importing it here would import the converter's own gguf package.
    tree = ast.parse((Path(src) / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return ast.literal_eval(node.value)
    raise UserError(f"{src}/conversion/__init__.py has no TEXT_MODEL_MAP; the llama.cpp source layout changed")


def check_architecture(model_dir: Path) -> str:
    """The checkpoint's architecture, or a clear error when llama.cpp's converter does not know it."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise UserError(f"{model_dir}/config.json has no 'architectures' entry; cannot tell the converter what it is")
    known = supported_architectures()
    if archs[0] not in known:
        import difflib

        close = difflib.get_close_matches(archs[0], sorted(known), n=3)
        hint = f" Closest known: {', '.join(close)}." if close else ""
        raise UserError(
            f"{model_dir}/config.json: architecture {archs[0]!r} is not supported by llama.cpp's converter "
            f"(llama-cpp-python {sdist.installed_version()}), so it cannot become a GGUF.{hint} "
            "Use the merged Hugging Face checkpoint in export/merged/ instead, or a newer llama-cpp-python."
        )
    return archs[0]


def estimate_bytes(n_params: int, qtype: str) -> int:
    return int(n_params * BITS_PER_WEIGHT.get(qtype.upper(), 16.0) / 8)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    import shutil

    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # 10% and 256 MiB headroom: the converter and quantizer write temporary files next to the outputs.
    if free < needed * 1.1 + (256 << 20):
        raise UserError(
            f"not enough disk space in {probe} for {what}: about {needed / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free. Free some space or set runs_dir to a bigger disk."
        )


def missing_mtp_layers(model_dir: Path) -> bool:
    """True when config.json declares multi-token-prediction layers (Qwen3.5 ``mtp_num_hidden_layers``, DeepSeek/GLM
    ``num_nextn_predict_layers``) that the checkpoint's weights do not hold: transformers drops them when it loads
    the model, so a merged or fine-tuned checkpoint never has them, and the converter would look for them."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    declared = [config, config.get("text_config") or {}]
    if not any(int(c.get(k) or 0) > 0 for c in declared for k in ("mtp_num_hidden_layers", "num_nextn_predict_layers")):
        return False
    return not any(".mtp." in f".{name}" or "nextn" in name for name in _tensor_names(Path(model_dir)))


def _tensor_names(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="np") as st:
            names += list(st.keys())
    return names


def convert_model(model_dir: Path, out_file: Path, outtype: str = "F16") -> Path:
    """Run convert_hf_to_gguf.py on a checkpoint folder; writes out_file atomically."""
    check_architecture(model_dir)
    # absolute paths: the converter runs with llama.cpp's tree as its working directory
    model_dir, out_file = Path(model_dir).resolve(), Path(out_file).resolve()
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    extra = ["--no-mtp"] if missing_mtp_layers(model_dir) else []
    _run_converter("convert_hf_to_gguf.py",
                   [str(model_dir), "--outtype", outtype.lower(), "--outfile", str(tmp), *extra],
                   what=f"converting {model_dir} to GGUF")
    os.replace(tmp, out_file)
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "F16") -> Path:
    """Run convert_lora_to_gguf.py: a PEFT LoRA adapter -> GGUF adapter for ``Llama(lora_path=...)``."""
    # absolute paths: the converter runs with llama.cpp's tree as its working directory
    adapter_dir, base_dir, out_file = Path(adapter_dir).resolve(), Path(base_dir).resolve(), Path(out_file).resolve()
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    _run_converter("convert_lora_to_gguf.py",
                   ["--base", str(base_dir), "--outtype", outtype.lower(), "--outfile", str(tmp), str(adapter_dir)],
                   what=f"converting the LoRA adapter {adapter_dir} to GGUF",
                   no_mtp=missing_mtp_layers(base_dir))
    os.replace(tmp, out_file)
    return out_file


# convert_lora_to_gguf.py has no --no-mtp flag; this sets the class attribute that convert_hf_to_gguf.py's --no-mtp
# sets (``model_class.no_mtp = True``) on the base of every model class, then runs the script unchanged.
_NO_MTP_BOOTSTRAP = (
    "import runpy, sys; sys.path.insert(0, '.'); from conversion.base import ModelBase; "
    "assert hasattr(ModelBase, 'no_mtp'), 'llama.cpp converter: ModelBase.no_mtp is gone'; "
    "ModelBase.no_mtp = True; script = sys.argv.pop(1); sys.argv[0] = script; "
    "runpy.run_path(script, run_name='__main__')"
)


def _run_converter(script: str, args: list[str], *, what: str, no_mtp: bool = False) -> None:
    src = sdist.llama_cpp_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src / "gguf-py")  # the converter's own gguf, never the registry one
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything it needs is local; never let it reach for the Hub
    cmd = [sys.executable, "-c", _NO_MTP_BOOTSTRAP, str(src / script)] if no_mtp else [sys.executable, str(src / script)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=str(src), errors="replace")
    if proc.returncode != 0:
        log = proc.stderr + proc.stdout
        tail = "\n".join(log.strip().splitlines()[-15:])
        for needle, advice in _KNOWN_FAILURES:
            if needle in log:
                raise UserError(f"{what} failed: {advice}.\nConverter output (last lines):\n{tail}")
        raise UserError(f"{what} failed (exit {proc.returncode}). Converter output (last lines):\n{tail}")
