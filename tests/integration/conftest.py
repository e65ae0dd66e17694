"""Fixtures of the integration tier: the real CLI in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def finetune():
    """`python -m finetune ARGS...` from the repository root, offline, as a user runs it: returns the finished
    process (stdout and stderr captured as text). ``timeout`` is in seconds."""

    def run(*args: str, timeout: int = 2700, **kwargs) -> subprocess.CompletedProcess:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    return run

