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



@pytest.mark.parametrize("config", [{"peft_type": "LORA", "use_dora": True},
                                    {"peft_type": "LORA", "use_dora": False,
                                     "target_parameters": ["mlp.experts.down_proj"]}])
def test_adapters_llama_cpp_cannot_load_get_no_adapter_gguf(tmp_path, config):
    """DoRA and LoRA on expert tensors (as their adapter_config.json says) have no llama.cpp adapter GGUF: export
    converts nothing for them and says to use the merged GGUFs."""
    import json

    from finetune import export

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert export._adapter_config(adapter) == config and export._is_dora(adapter) is config["use_dora"]
    messages: list[str] = []
    assert export._adapter_ggufs("a", tmp_path, adapter, tmp_path / "base", None, messages.append) == (None, None)
    assert "use the merged GGUFs" in messages[0] and not list(tmp_path.glob("*.gguf"))


def test_a_folder_without_adapter_config_reads_as_an_empty_config(tmp_path):
    from finetune import export

    assert export._adapter_config(tmp_path) == {} and export._is_dora(tmp_path) is False
