"""Image-text checkpoints (Qwen3.5, Gemma 4, Mistral 3 publish their instruct models as ``*ForConditionalGeneration``):
text-only fine-tuning of their language model, with the vision tower and projector kept as they are.

Training loads the checkpoint's language model alone (transformers' text class of the family reads it out of the
image-text checkpoint), so the adapters can only land on the language model's linear layers and the vision weights
are not even in memory. Export merges into that language model, then writes the whole image-text checkpoint again:
the base's vision tower and projector loaded and saved unchanged (same dtype, same bytes), the language model
replaced by the merged one. llama.cpp's converter makes the text GGUF of it (no mmproj: images are not trained).

A family whose language model transformers cannot load on its own (no causal-LM class for it) is refused before
training, with the nearest supported alternative.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from finetune.errors import UserError

# Files of an image-text checkpoint that describe how images are preprocessed: copied into merged/ unchanged, so
# the merged checkpoint loads with its processor as the base did.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

# What an export's README says of an image-text base.
README_NOTE = ("The base is an image-text checkpoint; this is a text-only fine-tune. Trained: the language model's "
               "linear layers. Not trained: the vision tower and the projector, which `merged/` keeps byte for byte "
               "as the base has them (with the base's image preprocessor files). The GGUFs are the text model only: no mmproj file is written, so llama.cpp and Ollama serve them for text chats.")


def is_image_text(config: dict[str, Any]) -> bool:
    """A config.json (as a dict) of a checkpoint with a vision tower beside its language model."""
    return isinstance(config.get("vision_config"), dict) and isinstance(config.get("text_config"), dict)


# The nearest supported choice for a refused image-text family (by config.json model_type).
ALTERNATIVES = {
    "gemma4": "a Gemma text-only checkpoint (Gemma4ForCausalLM, or Gemma3ForCausalLM such as google/gemma-3-1b-it)",
    "mistral3": "a text-only Mistral checkpoint (MistralForCausalLM, such as mistralai/Mistral-7B-Instruct-v0.3)",
}
SUPPORTED = "Qwen3.5's image-text checkpoints (Qwen3_5ForConditionalGeneration, such as Qwen/Qwen3.5-4B)"


def text_model_problem(config: dict[str, Any]) -> str | None:
    """Why the language model of this image-text checkpoint cannot be fine-tuned alone, with the nearest supported
    alternative; None when it can (or it is not an image-text checkpoint). Read from transformers' own class
    table: the causal-LM class it maps the checkpoint to must be the language model alone."""
    if not is_image_text(config):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = (config.get("architectures") or ["?"])[0]
    model_type = config.get("model_type")
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if cls is None:
        why = (f"{arch} is an image-text checkpoint whose language model transformers cannot load on its own (no "
               f"causal-LM class for model_type {model_type!r})")
    elif cls == arch:
        why = (f"{arch} is an image-text checkpoint that transformers loads as a causal LM only whole, vision tower "
               "included, so LoRA would not be kept to the language model")
    else:
        return None
    alternative = ALTERNATIVES.get(str(model_type), "the family's text-only checkpoint (a *ForCausalLM model)")
    return f"{why}; text-only fine-tuning is supported for {SUPPORTED}. Use {alternative} instead"


def check_text_model(config: dict[str, Any], *, where: str = "model.id") -> None:
    """Refuse (validate, plan, train) an image-text checkpoint whose language model cannot be trained alone."""
    problem = text_model_problem(config)
    if problem:
        raise UserError(f"{where}: {problem}.")


def with_vision_tower(text_model, base_dir: Path, dtype):
    """The base's whole image-text model (``base_dir``, loaded in ``dtype``: its vision weights pass through
    unchanged) with ``text_model``'s language model and output layer (a causal LM of the same family, merged)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(base_dir)
    arch = (config.architectures or ["?"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModelForImageTextToText
    full = cls.from_pretrained(base_dir, dtype=dtype, use_safetensors=True)
    rows = text_model.get_input_embeddings().weight.shape[0]
    if full.get_input_embeddings().weight.shape[0] != rows:  # tokens added in training
        full.resize_token_embeddings(rows)
    with torch.no_grad():
        full.get_decoder().load_state_dict(text_model.get_decoder().state_dict(), strict=True)
        head, text_head = full.get_output_embeddings(), text_model.get_output_embeddings()
        if head.weight.data_ptr() != full.get_input_embeddings().weight.data_ptr():  # untied: its own weights
            head.load_state_dict(text_head.state_dict(), strict=True)
    return full


def copy_processor_files(base_dir: Path, out: Path) -> list[str]:
    """The base's image preprocessor files into ``out`` (those it has); their names."""
    copied = []
    for name in PROCESSOR_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copyfile(Path(base_dir) / name, Path(out) / name)
            copied.append(name)
    return copied
