"""What a training run shows and hears while it runs: the progress bar, the log (log.jsonl and TensorBoard) and
Ctrl-C. Each is a context manager: ``with Progress(...) as progress, StopSignal() as stop: ...``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

# log entry key -> TensorBoard tag
SCALARS = {"loss": "train/loss", "val_loss": "eval/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s"}
GRPO_SCALARS = ("reward", "val_reward", "kl", "clip_fraction", "completion_length", "generation_s", "loss_s")


class StopSignal:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save a checkpoint; a second one
    interrupts at once. The previous handlers are back when the ``with`` block ends."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\ntrain: stopping after this step and saving a checkpoint (press Ctrl-C again to abort now)",
              file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain lines otherwise (logs, CI). Only the main
    process (``enabled``) shows anything. ``note`` still prints after the bar has stopped."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.done = done
        self.bar = None
        self.last_line = 0.0

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  ETA"),
                           TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, loss="-", speed="-")
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:.0f}")
        elif time.time() - self.last_line > 10 or step == self.total:
            self.last_line = time.time()
            print(f"train: step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s", file=sys.stderr)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(f"train: {text}", file=sys.stderr)


class RunLog:
    """``folder``/log.jsonl (one JSON entry per line) and TensorBoard scalars under ``folder``/tb, written by the
    main process only (``enabled``). Opening it rewrites log.jsonl from ``history`` (a resumed run's entries so
    far) and drops TensorBoard events after ``purge_step``."""

    def __init__(self, folder: Path, history: list[dict[str, Any]], *, purge_step: int | None,
                 enabled: bool) -> None:
        self.path = Path(folder) / "log.jsonl"
        self.tb_dir = Path(folder) / "tb"
        self.history = history
        self.purge_step = purge_step
        self.enabled = enabled
        self.writer = None

    def __enter__(self) -> RunLog:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            from finetune.run import runs

            runs.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
            self.writer = SummaryWriter(str(self.tb_dir), purge_step=self.purge_step)
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, entry: dict[str, Any]) -> None:
        if self.writer is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        for key, tag in SCALARS.items():
            if entry.get(key) is not None:
                self.writer.add_scalar(tag, entry[key], entry["step"])
        for key, value in entry.items():  # GRPO's per-step metrics (training/grpo.py) and held-out reward
            if key.startswith(GRPO_SCALARS) and isinstance(value, (int, float)):
                self.writer.add_scalar(f"grpo/{key}", value, entry["step"])
