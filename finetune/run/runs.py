"""Run folders, manifests and atomic writes: every artifact records what produced it.

Each stage writes into ``runs/<recipe name>/<stage>/`` and ends with a ``manifest.json``: the resolved
recipe, library versions, input fingerprints (and the manifests of the stages it read), seed, start/end time
and the files it produced. A stage is finished exactly when its manifest exists; the manifest is written last
and atomically. Stages build their outputs beside the finished folder (``runs/<name>/.<stage>.partial``) and
swap it in only on success, so a failed or interrupted stage leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import contextlib
import errno
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

from finetune.errors import UserError


class NothingToDo(UserError):
    """A stage has nothing to work on (eval with an empty test split): an error when run alone (exit 2), a
    skipped stage in ``finetune run``."""


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
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, final: Path) -> None:
    """Put the folder ``new`` at ``final``, replacing what was there (then deleted).

    On Linux the two folders are exchanged in one step (renameat2 RENAME_EXCHANGE): at no moment is ``final``
    missing or half-written. Elsewhere the old folder is renamed away first, then ``new`` into place.
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the previous contents
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or the filesystem cannot (then the caller renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def link_tree(src: Path, dst: Path) -> None:
    """A copy of a folder whose files are hard links (instant, no extra disk). Safe for folders whose files are
    only ever replaced, never rewritten in place (checkpoints, atomic writes); copies where links are refused."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


@contextlib.contextmanager
def run_lock(recipe: Any, command: str) -> Iterator[None]:
    """Hold ``runs/<name>/.lock`` while a command writes into the run: a second ``finetune`` command on the same
    run stops at once with an error (exit 2) instead of racing the first for its folders. The lock is the
    operating system's (released when the process ends, even killed); ranks of a multi-process training other than
    the first do not take it (the first holds it for them)."""
    from filelock import FileLock, Timeout

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = make_dir(recipe.run_dir())
    lock = FileLock(folder / ".lock", is_singleton=True)  # one lock object per path: re-entrant in this process
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"run '{recipe.name}' ({folder}) is in use by another finetune command: wait for it to "
                        f"finish, or start `finetune {command}` with another name (name=...)") from None
    try:
        yield
    finally:
        lock.release()


def make_dir(path: Path) -> Path:
    """``mkdir -p`` that says what is wrong (a file in the way, a read-only folder) and how to fix it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise UserError(f"{blocker} is a file, not a folder, so {path} cannot be created. Set runs_dir to a folder "
                        "(e.g. `runs_dir=runs`), or move that file away.") from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"cannot write to {path} ({exc.strerror}). Make it writable, or set runs_dir to a folder "
                        "you can write to, e.g. `runs_dir=$HOME/finetune-runs`.") from None
    return path


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


def manifest_id(manifest: dict[str, Any] | None) -> str | None:
    """What a stage records about each upstream manifest it read: a later run of that stage changes it."""
    return fingerprint_json(manifest) if manifest else None


def changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two recipe sections (for a readable reason)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


class StageRun:
    """Bookkeeping for one stage: ``with StageRun(recipe, 'train', aside=True) as run: ...`` writing into
    ``run.work`` and naming outputs by their final place under ``run.dir``.

    ``aside=True`` (every stage of the pipeline): the outputs are built in ``run.work``, a sibling folder
    ``.<stage>.partial``; on success the manifest is written there and the folder replaces ``run.dir`` in one
    step; on failure ``run.dir`` is left exactly as it was. ``keep_partial`` keeps the work folder after a failure
    (train resumes from the checkpoints in it). Without ``aside`` the stage writes into ``run.dir`` itself
    (``run.work`` is ``run.dir``), whose manifest is removed first so a half-written folder never looks finished.
    ``upstream``: {stage: manifest id} of the records the stage read (``artifacts.Upstream.ids()``), recorded so
    that a later run of those stages makes this one stale. ``record(artifact)`` sets the outputs from the stage's
    typed record (``finetune.run.artifacts``).
    """

    def __init__(self, recipe: Any, stage: str, inputs: dict[str, Any] | None = None, *,
                 upstream: dict[str, str | None] | None = None, aside: bool = False,
                 keep_partial: bool = False, folder: Path | None = None):
        self.recipe = recipe
        self.stage = stage
        self.dir = Path(folder) if folder is not None else recipe.run_dir(stage)
        self.aside = aside
        self.keep_partial = keep_partial
        self.work = self.dir.with_name(f".{self.dir.name}.partial") if aside else self.dir
        self.inputs: dict[str, Any] = dict(inputs or {})
        if upstream is not None:
            self.inputs["upstream"] = dict(upstream)
        self.outputs: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.started = time.time()

    def __enter__(self) -> StageRun:
        make_dir(self.dir.parent)
        if not self.aside:
            make_dir(self.dir)
            # A stage that starts again is not finished until it writes its manifest again.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / "manifest.json")
        elif self.work.exists() and not self.keep_partial:
            shutil.rmtree(self.work)  # left by a run that was killed
        make_dir(self.work)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write_manifest()
            if self.aside:
                replace_dir(self.work, self.dir)
        elif self.aside and not self.keep_partial:
            shutil.rmtree(self.work, ignore_errors=True)

    def record(self, artifact: Any) -> None:
        """The stage's outputs: its ``finetune.run.artifacts`` record, paths relative to the run folder."""
        self.outputs = artifact.to_outputs(self.recipe.run_dir())

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
        atomic_write_json(self.work / "manifest.json", self.manifest())


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON (edited by hand?); run that stage again to rewrite it.") from None


def require_stage(recipe: Any, stage: str, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """The manifest of a finished earlier stage, or a clear error saying which command to run first."""
    manifest = read_manifest(recipe.run_dir(stage))
    if manifest is None:
        raise UserError(
            f"stage '{stage}' has not finished for run '{recipe.name}' (no {recipe.run_dir(stage)}/manifest.json). "
            f"Run `finetune {stage} {recipe_path}` first."
        )
    return manifest


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
