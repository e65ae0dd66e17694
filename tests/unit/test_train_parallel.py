"""Distributed setups train refuses (sharded types), with the way out. Real data-parallel training in 2 processes:
tests/integration/test_train_ddp.py."""

from __future__ import annotations

import pytest

from finetune import train


def test_sharded_distributed_types_are_refused_with_the_way_out():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from finetune.errors import UserError

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(UserError, match=f"distributed_type {kind.value} is not supported.*multi-gpu.yaml"):
            train._check_distributed(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        train._check_distributed(SimpleNamespace(distributed_type=kind))
