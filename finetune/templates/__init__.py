"""Built-in chat templates for base models (model.chat_template: NAME): the families' own Jinja templates, kept
beside this module with their sources and licences in NOTICE.md.

A base checkpoint often ships no chat template, and its tokenizer may lack the template's turn tokens. Naming a
template here gives prepare, train, eval, export and serve the same template file (``path``); a tokenizer that lacks
its turn tokens gets them as special tokens (``add_turn_tokens``), whose embedding rows train then adds and trains
(finetune.training.model_setup). ``fitting`` says which name suits a template-less tokenizer (``finetune doctor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Template:
    name: str
    family: str                   # who uses it
    turn_tokens: tuple[str, ...]  # control tokens the template writes; the tokenizer must hold each as one token
    tools: bool                   # the template renders a conversation's tools and the assistant's tool calls
    model_types: tuple[str, ...] = ()  # config.json model_type values of the family (doctor's first guess)


TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("chatml", "ChatML (SmolLM, OpenHermes, many others)", ("<|im_start|>", "<|im_end|>"), False),
    Template("llama3", "Llama 3.1/3.2/3.3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                                            "<|python_tag|>"), True, ("llama",)),
    Template("gemma", "Gemma 2/3", ("<start_of_turn>", "<end_of_turn>"), False,
             ("gemma", "gemma2", "gemma3", "gemma3_text")),
    Template("gemma4", "Gemma 4", ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>",
                                   "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'),
             True, ("gemma4", "gemma4_text")),
    Template("qwen2.5", "Qwen2.5", ("<|im_start|>", "<|im_end|>"), True, ("qwen2",)),
    Template("qwen3", "Qwen3 (thinking)", ("<|im_start|>", "<|im_end|>"), True, ("qwen3", "qwen3_moe")),
    Template("mistral", "Mistral ([INST] turns)", ("[INST]", "[/INST]"), True, ("mistral",)),
    Template("phi3", "Phi-3/3.5, Phi-4-mini", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), False,
             ("phi3",)),
    Template("phi4", "Phi-4 (14B)", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), False),
    Template("granite", "Granite 4.0", ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"), True,
             ("granite", "granitemoe", "granitemoehybrid")),
]}
NAMES = tuple(TEMPLATES)


def names_hint() -> str:
    """The sentence every "no template" error ends with: the option and the built-in names."""
    return (f"set model.chat_template to a built-in template name ({', '.join(NAMES)}) or to a .jinja file")


def is_name(value: str) -> bool:
    return value in TEMPLATES


def path(name: str) -> Path:
    """The template file of a built-in name."""
    return FOLDER / f"{name}.jinja"


def builtin_of(file: Path | None) -> Template | None:
    """The built-in template a template file is (by its place in this package), else None."""
    if file is None:
        return None
    file = Path(file).resolve()
    if file.parent != FOLDER or file.suffix != ".jinja":
        return None
    return TEMPLATES.get(file.stem)


def missing_tokens(tokenizer, template: Template) -> list[str]:
    """The template's turn tokens that the tokenizer does not keep as one token of its own."""
    vocab = tokenizer.get_vocab()
    return [t for t in template.turn_tokens if t not in vocab]


def add_turn_tokens(tokenizer, template: Template) -> list[str]:
    """Add the template's missing turn tokens to the tokenizer as special tokens (never split, never trained on as
    text); returns those added. Their ids follow the tokenizer's last, so every stage that loads the same base
    tokenizer with the same template gets the same ids."""
    missing = missing_tokens(tokenizer, template)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def new_token_ids(tokenizer, base_tokenizer) -> list[int]:
    """Ids of the tokens ``tokenizer`` holds that the base model's own tokenizer does not (the turn tokens a
    built-in template added): the embedding rows training must learn."""
    base = base_tokenizer.get_vocab()
    return sorted(i for t, i in tokenizer.get_vocab().items() if t not in base)


def fitting(tokenizer, model_type: str | None = None) -> tuple[str, list[str]]:
    """The built-in name that suits a template-less tokenizer and the turn tokens it would add: the family's own (by
    config model_type) when the tokenizer holds its turn tokens, else the first whose turn tokens it all holds (no
    new rows to train), else the family's own, else ChatML (their turn tokens added)."""
    family = next((t for t in TEMPLATES.values() if model_type in t.model_types), None)
    order = ([family] if family else []) + list(TEMPLATES.values())
    choice = next((t for t in order if not missing_tokens(tokenizer, t)), family or TEMPLATES["chatml"])
    return choice.name, missing_tokens(tokenizer, choice)
