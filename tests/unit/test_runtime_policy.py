"""The OpenMP wait policy of llama.cpp child processes follows how busy the machine is."""

from __future__ import annotations

import os

import pytest

from finetune.gguf import runtime


@pytest.mark.parametrize("load, threads, policy", [
    (0.1, 2, "ACTIVE"),    # idle 2-core machine: spinning threads have their cores
    (1.2, 2, "PASSIVE"),   # one core already taken: a spinning thread would wait for it
    (3.0, 1, "PASSIVE"),
    (0.4, 1, "ACTIVE"),
])
def test_policy_follows_the_load(monkeypatch, load, threads, policy):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "runnable_now", lambda: load)
    assert runtime.omp_wait_policy(threads) == policy


def test_runnable_now_counts_a_busy_process_right_away():
    """A spinning child shows up at once (a 1-minute average would lag behind it)."""
    import subprocess
    import sys
    import time

    before = runtime.runnable_now()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        seen = max(runtime.runnable_now() for _ in range(20))
    finally:
        spinner.kill()
    assert seen >= 1 and seen >= before
