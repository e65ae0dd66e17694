"""Batches for training: which examples go together, and how they become tensors.

The plan (which example indices form each micro-batch, and which micro-batches form each optimizer step) is
a pure function of the lengths, the seed and the epoch. So a resumed run, or a run on more processes, sees
exactly the same batches: resuming at step ``s`` is ``schedule[s:]``, and a data-parallel run with N processes
and accumulation A groups the same micro-batches as one process with accumulation N*A.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from finetune.data import tokenized
from finetune.data.render import IGNORE_INDEX

# Length grouping sorts within windows of this many batches: batches hold similar lengths (little padding,
# even packed lengths) while the order across the epoch stays random.
GROUP_WINDOW_BATCHES = 50


@dataclass(frozen=True)
class Step:
    """One optimizer step: its micro-batches (lists of example indices) and where it sits in the data."""

    epoch: int
    index_in_epoch: int
    steps_in_epoch: int
    micro_batches: tuple[tuple[int, ...], ...]

    @property
    def epoch_progress(self) -> float:
        """Epochs completed once this step is done (e.g. 1.5 = halfway through the second epoch)."""
        return self.epoch + (self.index_in_epoch + 1) / self.steps_in_epoch


def plan_epoch(lengths: list[int], *, batch_size: int, batch_tokens: int | None, seed: int, epoch: int,
               shuffle: bool = True) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: shuffled, grouped by length, batch order shuffled.

    With ``batch_tokens`` a batch is filled until it would exceed that many tokens (at least one example);
    otherwise it holds ``batch_size`` examples.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    window = GROUP_WINDOW_BATCHES * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += _cut(chunk, lengths, batch_size, batch_tokens)
    if shuffle:
        rng.shuffle(batches)
    return batches


def _cut(indices: list[int], lengths: list[int], batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    if batch_tokens is None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    out: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in indices:
        if current and tokens + lengths[i] > batch_tokens:
            out.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        out.append(current)
    return out


def schedule(lengths: list[int], *, batch_size: int, batch_tokens: int | None, micro_batches_per_step: int,
             seed: int, epochs: float, max_steps: int | None) -> list[Step]:
    """Every optimizer step of the run, in order. ``max_steps`` (when set) wins over ``epochs``."""
    if not lengths:
        return []
    steps: list[Step] = []
    epoch = 0
    while True:
        batches = plan_epoch(lengths, batch_size=batch_size, batch_tokens=batch_tokens, seed=seed, epoch=epoch)
        groups = [tuple(tuple(b) for b in batches[i:i + micro_batches_per_step])
                  for i in range(0, len(batches), micro_batches_per_step)]
        per_epoch = len(groups)
        if max_steps is None:
            remaining_epochs = epochs - epoch
            if remaining_epochs <= 0:
                break
            if remaining_epochs < 1:
                groups = groups[:max(1, math.ceil(remaining_epochs * len(groups)))]
        for i, g in enumerate(groups):
            steps.append(Step(epoch, i, per_epoch, g))
            if max_steps is not None and len(steps) >= max_steps:
                return steps
        epoch += 1
    return steps


def eval_batches(lengths: list[int], *, batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Validation batches: sorted by length (least padding), same for every call."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return _cut(order, lengths, batch_size, batch_tokens)


def collate_packed(examples: list[tuple[Any, Any]]):
    """Padding-free batch: all examples in one row, ``position_ids`` restarting at 0 for each one.

    The first label of every example is IGNORE_INDEX so that no token learns to predict across an example boundary.
    ``cu_seq_lens`` are the example boundaries, the keyword the attention functions read for packed rows.
    Examples are (ids, labels) as lists or numpy arrays; the tensors are int64 either way.
    """
    import numpy as np
    import torch

    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in examples])
    labels = np.concatenate([np.asarray(lab, dtype=np.int64) for _, lab in examples])
    lengths = [len(i) for i, _ in examples]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    labels[bounds[:-1]] = IGNORE_INDEX
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(lengths)
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "labels": torch.from_numpy(labels)[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }


def collate_padded(examples: list[tuple[Any, Any]], pad_id: int):
    """Right-padded batch with an attention mask; padding gets label -100."""
    import numpy as np
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, (i, lab) in enumerate(examples):
        ids[row, :len(i)], labels[row, :len(lab)], mask[row, :len(i)] = i, lab, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def count_targets(examples: list[tuple[Any, Any]]) -> int:
    """Tokens that carry loss once labels are shifted (the first label of an example never does)."""
    return sum(tokenized.count_targets(labels) for _, labels in examples)
