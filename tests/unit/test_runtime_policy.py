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
