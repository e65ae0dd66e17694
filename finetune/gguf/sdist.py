"""llama.cpp's own source tree, from the sdist of the installed llama-cpp-python version.

The converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``gguf-py``), the vocab-only test
GGUFs and the real chat templates under ``models/templates`` come from the same release the runtime was
built from, so architecture and pre-tokenizer names stay in step. Fetched once with pip (registry only)
into ``~/.cache/finetune/llama-cpp-src/<version>/``; nothing of it is copied into this repository.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from finetune.errors import UserError
from finetune.models import cache_root


def installed_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("llama-cpp-python is not installed; run `make install` (or scripts/install_llama_cpp.py)") from None


def sdist_archive(version: str | None = None, *, download: bool = True) -> Path | None:
    """The sdist tarball of llama-cpp-python==version (kept by the install script, else downloaded once)."""
    version = version or installed_version()
    folder = cache_root() / "sdists"
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.exists():
        return archive
    if not download:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "-d", tmp, f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not got:
            raise UserError(
                f"could not fetch the llama-cpp-python {version} source (needed for llama.cpp's GGUF converter): "
                f"{proc.stderr.strip()[-400:]}"
            )
        os.replace(got[0], archive)
    return archive


def llama_cpp_dir(version: str | None = None, *, download: bool = True) -> Path | None:
    """Extracted ``vendor/llama.cpp`` of the installed (or given) version; None if absent and download=False."""
    version = version or installed_version()
    target = cache_root() / "llama-cpp-src" / version
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    archive = sdist_archive(version, download=download)
    if archive is None:
        return None
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            members = [m for m in members if m.name]
            tar.extractall(tmp, members=members, filter="data")
        if not (Path(tmp) / "convert_hf_to_gguf.py").exists():
            raise UserError(f"{archive} has no vendor/llama.cpp/convert_hf_to_gguf.py; delete it and retry")
        if target.exists():
            return target
        os.replace(tmp, target)
        os.makedirs(tmp, exist_ok=True)  # let TemporaryDirectory clean up quietly
    return target
