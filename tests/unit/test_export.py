"""export refusing before it converts anything. export end to end on a tiny model (merge, llama.cpp conversion,
quantization, adapter GGUF, parity, Modelfiles): tests/integration/test_export_tiny_model.py."""

from __future__ import annotations

import pytest


def test_export_before_train_names_the_command(tmp_path):
    from finetune import export
    from finetune import recipe as recipe_mod
    from finetune.errors import UserError

    recipe = recipe_mod.validate_dict({"name": "nothing", "runs_dir": str(tmp_path)})
    with pytest.raises(UserError, match="finetune train"):
        export.run(recipe)
