"""A resume without a complete checkpoint says so. Interrupted runs (SIGKILL, Ctrl-C) resuming exactly:
tests/integration/test_train_interrupted.py."""

from __future__ import annotations

import pytest
from train_fixtures import prepared

from finetune import train


def test_resume_without_checkpoint_says_so(tmp_path, tiny_model_dir):
    from finetune.errors import UserError

    recipe = prepared(tmp_path, tiny_model_dir, max_steps=2)
    with pytest.raises(UserError, match="no complete checkpoint"):
        train.run(recipe, resume=True)
