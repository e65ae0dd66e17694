"""Tiny image-text twins: the checkpoint a Hub download of an image-text instruct model looks like (Qwen3.5 publishes
its instruct models only as ``Qwen3_5ForConditionalGeneration``), built from a text twin of scripts/twins.py.

The language model is the text twin's (same config, same weights: a primed text twin stays primed), wrapped in the
family's image-text class with a tiny vision tower and projector (random weights; text-only fine-tuning must leave
them as they are). The tokenizer, chat template and generation config are the text twin's.

    python scripts/twins_vl.py [FAMILY ...]     # build (or find) the image-text twins of text twins; prints folders
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twins  # noqa: E402


@dataclass(frozen=True)
class ImageText:
    text_family: str                 # the twins.FAMILIES entry whose language model it wraps
    arch: str                        # transformers class (config.json "architectures")
    vision: dict[str, Any]           # the tiny vision config
    extra: dict[str, Any]            # top-level config keys of the real checkpoint (image token ids, ...)


IMAGE_TEXT: dict[str, ImageText] = {
    "qwen3.5": ImageText(
        "qwen3.5", "Qwen3_5ForConditionalGeneration",
        # Qwen3.5-4B: depth 24, width 1024, patch 16, 2x2 merge into the text width; here 2 blocks of width 32
        {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
         "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64},
        {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
         "vision_end_token_id": 151653}),
    "gemma4": ImageText(
        "gemma4", "Gemma4ForConditionalGeneration",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "head_dim": 16, "position_embedding_size": 64},
        {}),
    "mistral3": ImageText(
        "ministral3", "Mistral3ForConditionalGeneration",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
         "image_size": 224, "patch_size": 14},
        {"image_token_index": 10}),
}


def key(name: str) -> str:
    return hashlib.sha256((Path(__file__).read_text(encoding="utf-8") + repr(IMAGE_TEXT[name])).encode()).hexdigest()[:8]


def build(name: str, text_twin: Path, *, log=print) -> Path:
    """The image-text twin wrapping ``text_twin`` (a twins.py folder, primed or not), built once next to it."""
    from finetune.run import runs

    out = text_twin.parent / f"{text_twin.name}-vl-{key(name)}"
    if (out / "config.json").exists():
        return out
    log(f"twins: building the image-text twin of {text_twin.name}")
    with runs.atomic_dir(out) as tmp:
        _model(IMAGE_TEXT[name], text_twin, Path(tmp))
        for f in text_twin.iterdir():  # tokenizer files, chat template, the Hub-like generation config
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "primed.json"):
                shutil.copyfile(f, Path(tmp) / f.name)
    return out


def _model(spec: ImageText, text_twin: Path, out: Path) -> None:
    import torch
    import transformers

    cls = getattr(transformers, spec.arch)
    text_cls = getattr(transformers, twins.FAMILIES[spec.text_family].arch)
    text_model = text_cls.from_pretrained(text_twin, dtype=torch.bfloat16)
    text = json.loads((text_twin / "config.json").read_text())
    for k in ("architectures", "dtype", "transformers_version"):
        text.pop(k, None)
    vision = {**spec.vision, **({"out_hidden_size": text["hidden_size"]} if "out_hidden_size" in spec.vision else {})}
    config = cls.config_class(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                              **spec.extra)
    config.architectures = [spec.arch]
    torch.manual_seed(0)
    model = cls(config).to(torch.bfloat16)
    with torch.no_grad():  # the language model is the text twin's, weight for weight
        model.get_decoder().load_state_dict(text_model.get_decoder().state_dict(), strict=True)
        model.get_output_embeddings().load_state_dict(text_model.get_output_embeddings().state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    if "layer_types" in text:  # as the real config.json spells them
        saved["text_config"]["layer_types"] = text["layer_types"]
    for k in ("mtp_num_hidden_layers",):  # declared by the real config.json, unknown to the config class
        if k in text:
            saved["text_config"][k] = text[k]
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    for name in argv or list(IMAGE_TEXT):
        print(name, build(name, twins.build(IMAGE_TEXT[name].text_family)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
