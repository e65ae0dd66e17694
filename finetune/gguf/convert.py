"""Hugging Face checkpoint -> GGUF with llama.cpp's own converter, in a child process.

The converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, their ``conversion/`` package and
``gguf-py``) comes from the sdist of the installed llama-cpp-python (``finetune.gguf.sdist``), so architecture
and pre-tokenizer names match the runtime. It runs as a child process with PYTHONPATH pointing at that tree's
``gguf-py``: its ``gguf`` package must not meet the registry ``gguf`` that transformers imports in this process.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from finetune import models
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


# transformers 5 saves layer_types in its own words whatever the checkpoint said ("mamba" -> "linear_attention",
# "attention" -> "full_attention"), and llama.cpp's Granite 4 converter finds its attention layers by the word
# "attention": with transformers' words it writes every layer as a Mamba-2 layer, and llama.cpp refuses the GGUF
# ("check_tensor_dims: tensor 'blk.1.ssm_in.weight' not found"). Per model_type: transformers' word -> the converter's.
_CONVERTER_LAYER_TYPES = {"granitemoehybrid": {"linear_attention": "mamba", "full_attention": "attention"}}


def _as_the_converter_reads_it(model_dir: Path) -> contextlib.AbstractContextManager[Path]:
    """``model_dir`` itself, or, where its config.json's layer_types need the converter's words, a temporary folder
    of the same name with links to its files and such a config.json (the checkpoint itself is never rewritten)."""
    config = models.read_config(model_dir)
    words = _CONVERTER_LAYER_TYPES.get(config.get("model_type"), {})
    layer_types = config.get("layer_types") or []
    spelt = [words.get(t, t) for t in layer_types]
    if spelt == layer_types:
        return contextlib.nullcontext(model_dir)
    return _linked_copy(model_dir, {**config, "layer_types": spelt})


@contextlib.contextmanager
def _linked_copy(model_dir: Path, config: dict) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="finetune-convert-") as tmp:
        view = Path(tmp) / model_dir.name  # the converter's default general.name comes from the folder's name
        view.mkdir()
        for f in model_dir.iterdir():
            if f.name != "config.json":
                (view / f.name).symlink_to(f)
        (view / "config.json").write_text(json.dumps(config, indent=2))
        yield view


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
    config = models.read_config(model_dir)
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


def adapter_gguf_problem(architecture: str, *, download: bool = True) -> str | None:
    """Why llama.cpp's LoRA converter cannot write a GGUF adapter for this architecture; None when it can.

    ``convert_lora_to_gguf.py`` subclasses the architecture's converter class and overrides how tensors are read
    and what is written. A class that hands writing to an inner model object (llama.cpp's ``Mistral3Model`` does,
    ``self.impl.write()``, for Ministral 3 and Mistral Small 3.x) bypasses those overrides: the "adapter" file is
    the whole base model, and llama.cpp crashes loading it as an adapter. Read from the converter source, so the
    refusal goes away when llama.cpp's converter changes. With download=False (checks before training), an
    uncached converter source answers None: export checks again when it has fetched the source.
    """
    try:
        src = sdist.llama_cpp_dir(download=download)
    except UserError:  # llama-cpp-python is not installed: export says so
        return None
    module = _text_model_map(str(src)).get(architecture) if src is not None else None
    if module is None:
        return None
    cls = _registered_class(src / "conversion" / f"{module}.py", architecture)
    if cls is None:
        return None
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "write" and any(
                isinstance(n, ast.Attribute) and n.attr == "write" and isinstance(n.value, ast.Attribute)
                and isinstance(n.value.value, ast.Name) and n.value.value.id == "self" for n in ast.walk(node)):
            return (f"llama.cpp's converter cannot write a LoRA adapter GGUF for {architecture}: its converter class "
                    f"{cls.name} hands writing to an inner model, so convert_lora_to_gguf.py would write the whole "
                    "base model instead of the adapter (and llama.cpp crashes loading that as an adapter)")
    return None


def _registered_class(module_file: Path, architecture: str) -> ast.ClassDef | None:
    """The class of a converter module registered for ``architecture`` (``@ModelBase.register("Arch", ...)``)."""
    if not module_file.exists():
        return None
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "register"
                and any(isinstance(a, ast.Constant) and a.value == architecture for a in d.args)
                for d in node.decorator_list):
            return node
    return None


def check_adapter_gguf(config: dict, *, method: str = "lora", download: bool = True) -> None:
    """Refuse ``export.adapter_gguf`` up front (validate, plan, train, export) for a model (its config.json as a
    dict) whose LoRA adapter llama.cpp cannot write."""
    if method not in ("lora", "qlora"):  # DoRA has no GGUF adapter format (export skips it); full has no adapter
        return
    archs = config.get("architectures") or []
    problem = adapter_gguf_problem(archs[0], download=download) if archs else None
    if problem:
        raise UserError(f"export.adapter_gguf: {problem}. Set export.adapter_gguf: false; the merged GGUFs "
                        "(F16 and the quantized types) carry the fine-tune and serve as usual.")


def model_name(model_dir: Path) -> str:
    """The name a checkpoint folder's model goes by: the folder's name, or the repository's name for a Hub cache
    snapshot (``.../models--org--Name/snapshots/<commit>``)."""
    folder = Path(model_dir).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name


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
    """True when the checkpoint's weights hold no multi-token-prediction (MTP, "NextN") tensors, whatever its
    config.json declares: the converter is then told so (``no_mtp``). transformers drops MTP weights when it loads a
    model, so a merged or fine-tuned checkpoint never has them; and a config saved by transformers may not declare
    them either (its Qwen3_5Config has no ``mtp_num_hidden_layers``), where llama.cpp's Qwen3.5 converter, told
    nothing, counts MTP layers from the tensors and asserts that it found some. Only the weights tell."""
    model_dir = Path(model_dir)
    config = models.read_config(model_dir)
    layers = [int(c["num_hidden_layers"]) for c in (config.get("text_config") or {}, config)
              if isinstance(c.get("num_hidden_layers"), int)]
    return not any(_is_mtp_tensor(name, layers[0] if layers else None) for name in _tensor_names(model_dir))


def _is_mtp_tensor(name: str, main_layers: int | None) -> bool:
    """An MTP tensor: under an ``mtp.`` prefix (Qwen3.5/3-Next), named NextN (``eh_proj``, ``nextn``), or a decoder
    layer past the main ones (DeepSeek V3, GLM: ``model.layers.<num_hidden_layers>.``)."""
    if ".mtp." in f".{name}" or "nextn" in name or ".eh_proj." in f".{name}":
        return True
    match = re.match(r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.", name)  # the text decoder's
    return main_layers is not None and match is not None and int(match.group(1)) >= main_layers


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


def convert_model(model_dir: Path, out_file: Path, outtype: str = "F16", *, model_name: str | None = None) -> Path:
    """Run convert_hf_to_gguf.py on a checkpoint folder; writes out_file atomically.

    ``model_name`` becomes ``general.name`` (default: the converter's guess from the folder name, "Merged" for
    export's merged/ folder). llama.cpp keys model-specific tokenizer settings on that name: Phi-3's chat tokens
    strip the whitespace after them only when the name says "phi-3"/"phi3", as the Hugging Face tokenizer does.
    """
    check_architecture(model_dir)
    # absolute paths: the converter runs with llama.cpp's tree as its working directory
    model_dir, out_file = Path(model_dir).resolve(), Path(out_file).resolve()
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    extra = ["--model-name", model_name] if model_name else []
    with _as_the_converter_reads_it(model_dir) as source:
        # no MTP weights -> no MTP in the GGUF, set as convert_hf_to_gguf.py's --no-mtp sets it, but for every
        # architecture (the flag itself is refused by the classes that have no MTP support)
        _run_converter("convert_hf_to_gguf.py",
                       [str(source), "--outtype", outtype.lower(), "--outfile", str(tmp), *extra],
                       what=f"converting {model_dir} to GGUF", no_mtp=missing_mtp_layers(model_dir))
    os.replace(tmp, out_file)
    return out_file


def convert_lora(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "F16") -> Path:
    """Run convert_lora_to_gguf.py: a PEFT LoRA adapter -> GGUF adapter for ``Llama(lora_path=...)``."""
    # absolute paths: the converter runs with llama.cpp's tree as its working directory
    adapter_dir, base_dir, out_file = Path(adapter_dir).resolve(), Path(base_dir).resolve(), Path(out_file).resolve()
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    with _as_the_converter_reads_it(base_dir) as base:
        _run_converter("convert_lora_to_gguf.py",
                       ["--base", str(base), "--outtype", outtype.lower(), "--outfile", str(tmp), str(adapter_dir)],
                       what=f"converting the LoRA adapter {adapter_dir} to GGUF",
                       no_mtp=missing_mtp_layers(base_dir))
    kind = _gguf_type(tmp)
    if kind != "adapter":  # llama.cpp would crash loading it as an adapter: never leave such a file behind
        tmp.unlink(missing_ok=True)
        raise UserError(f"converting the LoRA adapter {adapter_dir} to GGUF wrote a GGUF of type {kind!r}, not a "
                        "LoRA adapter: llama.cpp's converter does not support adapters of this architecture. Set "
                        "export.adapter_gguf: false and use the merged GGUFs.")
    os.replace(tmp, out_file)
    return out_file


def _gguf_type(path: Path) -> str | None:
    """A GGUF's ``general.type`` ("model", "adapter", ...), read with gguf-py (metadata only, memory-mapped)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.type")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


# convert_lora_to_gguf.py has no --no-mtp flag, and convert_hf_to_gguf.py's is refused by architectures without MTP
# support; this sets the class attribute that --no-mtp sets (``model_class.no_mtp = True``) on the base of every
# model class, then runs the script unchanged. Classes without MTP support never read it.
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
