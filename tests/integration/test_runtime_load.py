"""The load llama.cpp child processes read to pick their OpenMP wait policy sees a busy process at once. The policy
itself: tests/unit/test_runtime_policy.py."""

from __future__ import annotations

from finetune.gguf import runtime


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
