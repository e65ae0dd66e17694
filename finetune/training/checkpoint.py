"""Training checkpoints: written into a temporary folder and renamed into place, so one either exists whole or not.

A checkpoint folder ``checkpoint-<step>/`` holds the trainable weights (``trainable.safetensors``), the optimizer
and scheduler state, every process's random number generator state, and ``state.json`` (step, counters, log
history) written last. Only folders named ``checkpoint-<step>`` with a ``state.json`` count as complete; the
temporary ``.checkpoint-<step>.tmp`` folders a killed run leaves behind are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


def complete(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def save(root: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically: ``write_files(tmp)`` fills the folder, then state.json, then one rename."""
    from finetune.runs import atomic_dir

    final = Path(root) / f"checkpoint-{step}"
    # atomic_dir's temporary folder is a hidden '.checkpoint-<step>.*.tmp' sibling: never taken for a checkpoint,
    # and removed by prune() if a killed run leaves it behind. A step saved again (a resumed run) is replaced whole.
    with atomic_dir(final) as tmp:
        write_files(tmp)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and leftovers of interrupted saves."""
    for _, path in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(root).iterdir():
        if path.name.startswith(".checkpoint-") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
