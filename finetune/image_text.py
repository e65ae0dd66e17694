"""Image-text checkpoints (Qwen3.5, Gemma 4, Mistral 3 publish their instruct models as ``*ForConditionalGeneration``):
text-only fine-tuning of their language model, with the vision tower and projector kept as they are.

Training loads the checkpoint's language model alone (the family's text class of transformers, reading the language
model's weights out of the image-text checkpoint), so the adapters can only land on the language model's linear
layers and the vision weights are not even in memory. Export merges into that language model, then writes the whole
image-text checkpoint again: the base's vision tower and projector loaded and saved unchanged (same dtype, same
bytes), the language model replaced by the merged one. llama.cpp's converter makes the text GGUF of it (no mmproj:
images are not trained).

A family whose language model transformers has no text class for is refused before training, with the nearest
supported alternative.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
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


# Where an image-text checkpoint keeps its language model, renamed to the text class's own names: transformers 5's
# layout (model.language_model.*, Gemma 4) and the Llava layout Mistral 3's checkpoints are saved in
# (language_model.model.*, language_model.lm_head.*).
TEXT_KEY_MAPPING = {r"^model\.language_model\.": "model.", r"^language_model\.model\.": "model.",
                    r"^language_model\.lm_head\.": "lm_head."}

ALTERNATIVE = "the family's text-only checkpoint (a *ForCausalLM model)"


@dataclass(frozen=True)
class TextModel:
    """How transformers loads the language model of an image-text checkpoint alone."""
    cls: str                      # the text class, e.g. Gemma4ForCausalLM
    from_text_config: bool        # built from the checkpoint's text_config, its weights renamed by TEXT_KEY_MAPPING
    #                               (False: transformers' own class table maps the checkpoint to it, as for Qwen3.5)


def text_model(config: dict[str, Any]) -> TextModel | None:
    """The text class that loads this image-text checkpoint's language model alone (None: not an image-text
    checkpoint, or transformers has no such class). Read from transformers' own class table."""
    if not is_image_text(config):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = (config.get("architectures") or ["?"])[0]
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if cls is not None and cls != arch:
        return TextModel(cls, from_text_config=False)
    text_cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config["text_config"].get("model_type"))
    if text_cls is not None and text_cls != arch:
        return TextModel(text_cls, from_text_config=True)
    return None


def text_model_problem(config: dict[str, Any]) -> str | None:
    """Why the language model of this image-text checkpoint cannot be fine-tuned alone, with the nearest supported
    alternative; None when it can (or it is not an image-text checkpoint)."""
    if not is_image_text(config) or text_model(config) is not None:
        return None
    arch = (config.get("architectures") or ["?"])[0]
    return (f"{arch} is an image-text checkpoint whose language model transformers cannot load on its own (no "
            f"causal-LM class for model_type {config.get('model_type')!r} or its text_config's "
            f"{config['text_config'].get('model_type')!r}), so LoRA could not be kept to the language model; "
            f"use {ALTERNATIVE} instead")


def load_text_model(folder: Path, spec: TextModel, **kwargs):
    """The language model of the image-text checkpoint in ``folder`` alone, as ``spec`` says (``kwargs``: those of
    ``from_pretrained``). Every weight of the text class must come from the checkpoint: one left at its random
    initialisation is an error, never a silent fine-tune of noise."""
    import transformers

    cls = getattr(transformers, spec.cls)
    if not spec.from_text_config:
        return cls.from_pretrained(folder, **kwargs)
    from transformers.utils import logging as hf_logging

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists every vision weight as unexpected: checked below instead
    try:
        model, info = cls.from_pretrained(folder, config=config.text_config, key_mapping=TEXT_KEY_MAPPING,
                                          output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    tied = {"lm_head.weight"} if getattr(config.text_config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info["missing_keys"]) - tied)
    if missing:
        raise UserError(f"model.id: the language model of {folder} could not be read out of its image-text "
                        f"checkpoint ({len(missing)} weights missing, e.g. {missing[0]}); use {ALTERNATIVE} instead")
    return model


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
