"""The merged checkpoint export converts: the LoRA/DoRA adapter merged into the base weights (or the full fine-tuned
model) on CPU in float32, saved in the base's dtype, with every tokenizer file llama.cpp's converter may read, the
chat template, a generation config transformers accepts, and the end-of-turn token as EOS (llama.cpp, Ollama and
``generate()`` all stop on it). An image-text base gets its vision tower back untouched (``finetune.image_text``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune import image_text, models
from finetune.errors import UserError
from finetune.run import runs
from finetune.training import model_setup


def checkpoint_dtype(model_dir: Path):
    import torch

    config = models.read_config(model_dir)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def load_chat_tokenizer(source: Path):
    """The tokenizer training saved, which must carry a chat template (a GGUF without one chats in the wrong format)."""
    tokenizer = models.load_tokenizer(source, pad_with_eos=False)
    if not tokenizer.chat_template:
        raise UserError(
            f"{source}: the tokenizer has no chat template, so the GGUF would have none and llama.cpp/Ollama would "
            "silently use another prompt format. Train from a model whose tokenizer has a chat template "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja), or add one before training."
        )
    return tokenizer


def merge(*, base_dir: Path | None, adapter_dir: Path | None, model_dir: Path | None, out_dir: Path) -> dict[str, Any]:
    """Write a standard HF checkpoint to out_dir: base + adapter merged (or the full fine-tuned model)."""
    import torch

    tokenizer = load_chat_tokenizer(adapter_dir or model_dir or base_dir)
    eot = models.end_of_turn_ids(tokenizer)  # a clear error for a template whose turns never end
    weights_dir = base_dir if adapter_dir else (model_dir or base_dir)
    save_dtype = checkpoint_dtype(weights_dir)
    # Merge in float32: W + s*B@A in bf16 would round the small LoRA update away.
    model = models.load_causal_lm(weights_dir, dtype=torch.float32, use_safetensors=True)
    if adapter_dir is not None:
        from peft import PeftModel

        model_setup.grow_embeddings(model, len(tokenizer))  # turn tokens a built-in model.chat_template added
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(save_dtype)
    n_params = model.num_parameters()
    vision_from = base_dir if base_dir is not None and image_text.is_image_text(_config(base_dir)) else None
    if vision_from is not None:  # the trained language model back into the whole image-text checkpoint
        model = image_text.with_vision_tower(model, vision_from, checkpoint_dtype(vision_from))

    # The end-of-turn token is the EOS of the exported model: llama.cpp, Ollama and HF generate() all stop on it.
    eos_before = tokenizer.eos_token
    eot_token = tokenizer.convert_ids_to_tokens(eot[0])
    if tokenizer.eos_token_id != eot[0]:
        tokenizer.eos_token = eot_token
    eos_ids = list(dict.fromkeys(eot + ([tokenizer.convert_tokens_to_ids(eos_before)] if eos_before else [])))
    model.generation_config = _generation_config(
        model.generation_config, bos=tokenizer.bos_token_id, eos=eos_ids,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0])
    model.config.eos_token_id = eot[0]
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.eos_token_id = eot[0]
    with runs.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if vision_from is not None:
            image_text.copy_processor_files(vision_from, Path(tmp))
        save_tokenizer(tokenizer, Path(tmp), sources=[d for d in (adapter_dir, model_dir, base_dir) if d])
    return {"path": str(out_dir), "dtype": str(save_dtype).removeprefix("torch."), "n_params": n_params,
            "end_of_turn": eot_token, "eos_before": eos_before, "eos_ids": eos_ids,
            "model_type": getattr(model.config, "model_type", None), "vision_kept": vision_from is not None}


def _config(model_dir: Path) -> dict[str, Any]:
    return models.read_config(model_dir)


def _generation_config(old, *, bos: int | None, eos: list[int], pad: int):
    """The base's generation settings as its authors shipped them (do_sample with its temperature/top_p/top_k:
    transformers refuses to save sampling values without do_sample), with our BOS/EOS/pad ids."""
    from transformers import GenerationConfig

    settings = {}
    if old is not None:
        settings = {k: v for k, v in old.to_diff_dict().items()
                    if k not in ("transformers_version", "bos_token_id", "eos_token_id", "pad_token_id")}
    config = GenerationConfig(**settings, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    try:
        config.validate(strict=True)
    except ValueError:
        # A base whose own generation config is inconsistent (sampling values, sampling off): keep what is valid.
        sampling = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
        config = GenerationConfig(**{k: v for k, v in settings.items() if k not in sampling},
                                  bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return config


# Tokenizer files llama.cpp's converter reads besides what ``save_pretrained`` writes: a SentencePiece model
# (Llama 2/Mistral/Phi-3/Gemma), tokens added on top of it, BPE vocab/merges, and the chat template files.
CONVERTER_TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "vocab.json",
                             "merges.txt", "tokenizer.json", "chat_template.jinja", "chat_template.json")


def save_tokenizer(tokenizer, out: Path, *, sources: list[Path]) -> None:
    """Save the tokenizer so that llama.cpp's converter sees the same vocabulary as transformers.

    ``save_pretrained`` (transformers 5) writes tokenizer.json and tokenizer_config.json only: no tokenizer.model,
    no added_tokens.json, no ``added_tokens_decoder``. The converter then fails (Phi-3: "Missing
    tokenizer.model") or builds the vocabulary from another file and tokenizes differently, and control tokens
    that exist only as added tokens are lost. So the files it may read are copied from the model's own folders
    (first found wins), and the added tokens are written into tokenizer_config.json from the live tokenizer.
    """
    import shutil

    tokenizer.save_pretrained(out)
    for name in CONVERTER_TOKENIZER_FILES:
        if (out / name).exists():
            continue
        found = next((Path(s) / name for s in sources if (Path(s) / name).is_file()), None)
        if found is not None:
            shutil.copyfile(found, out / name)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    # The converter picks a vocabulary reader by tokenizer_class (Phi-4-mini: GPT2Tokenizer -> BPE, else it looks
    # for tokenizer.model); transformers 5 saves "TokenizersBackend" instead of the model's own class.
    for source in sources:
        original = Path(source) / "tokenizer_config.json"
        if original.is_file():
            cls = json.loads(original.read_text(encoding="utf-8")).get("tokenizer_class")
            if cls and cls != "TokenizersBackend":
                if config.get("tokenizer_class") != cls:
                    config["tokenizer_class"] = cls
                    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                break
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if added and "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(added.items())}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
