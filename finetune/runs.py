"""Run folders, manifests and atomic writes: every artifact records what produced it.

Each stage writes into ``runs/<recipe name>/<stage>/`` and ends with a ``manifest.json``: the resolved
recipe, library versions, input fingerprints, seed, start/end time and the files it produced. A stage is
finished exactly when its manifest exists; the manifest is written last and atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LIBRARIES = [
    "finetune", "torch", "transformers", "datasets", "peft", "accelerate", "bitsandbytes", "evaluate",
    "llama-cpp-python", "gguf", "optuna", "datasketch", "pydantic",
]


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any file the user writes
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (or of a folder's files, names included)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def fingerprint_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class StageRun:
    """Bookkeeping for one stage: ``with StageRun(recipe, 'train') as run: ... run.outputs[...] = ...``."""

    def __init__(self, recipe: Any, stage: str, inputs: dict[str, Any] | None = None):
        self.recipe = recipe
        self.stage = stage
        self.dir = recipe.run_dir(stage)
        self.inputs: dict[str, Any] = dict(inputs or {})
        self.outputs: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.started = time.time()

    def __enter__(self) -> StageRun:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A stage that starts again is not finished until it writes its manifest again.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / "manifest.json")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write_manifest()

    def manifest(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "recipe": self.recipe.to_dict(),
            "recipe_dir": str(self.recipe.base_dir),
            "seed": self.recipe.seed,
            "versions": library_versions(),
            "platform": {"system": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                         "argv": sys.argv},
            "inputs": self.inputs,
            "outputs": self.outputs,
            "started": _iso(self.started),
            "finished": _iso(time.time()),
            "seconds": round(time.time() - self.started, 2),
            **self.extra,
        }

    def write_manifest(self) -> None:
        atomic_write_json(self.dir / "manifest.json", self.manifest())


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def require_stage(recipe: Any, stage: str, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """The manifest of a finished earlier stage, or a clear error saying which command to run first."""
    from finetune.errors import UserError

    manifest = read_manifest(recipe.run_dir(stage))
    if manifest is None:
        raise UserError(
            f"stage '{stage}' has not finished for run '{recipe.name}' (no {recipe.run_dir(stage)}/manifest.json). "
            f"Run `finetune {stage} {recipe_path}` first."
        )
    return manifest


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
