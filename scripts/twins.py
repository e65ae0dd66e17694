"""Tiny random-weight twins of the model families people fine-tune, for the family matrix (scripts/family_matrix.py).

A twin is a Hugging Face checkpoint folder that a Hub download of the real instruct model would look like, minus
the size: the real transformers architecture class with a scaled-down config (2-4 layers, width 64) that keeps
the family's structural features (sliding-window layers with a window smaller than the training sequences,
attention sinks, mixture-of-experts, linear-attention/mamba/conv layers, MTP layer counts in the config, tied or
untied embeddings as the real one), the family's real tokenizer and chat template from the llama.cpp source the
install keeps (``models/ggml-vocab-*.gguf``, ``models/templates/*.jinja``), and a Hub-like
``generation_config.json`` that samples (do_sample, temperature, top_p), as real instruct checkpoints ship.

SentencePiece families get a real ``tokenizer.model`` built from the vocab GGUF's pieces, scores and types (so
llama.cpp's converter takes its SentencePiece path as with real checkpoints), with control tokens that exist only
as added tokens where the real checkpoint has them so.

Where llama.cpp keeps no vocabulary of a family, the twin stands in another real vocabulary plus the family's own
control tokens, and says so in ``FAMILIES[name].standin`` (and the README's family table).

    python scripts/twins.py [FAMILY ...]     # build (or find) twins; prints their folders

Twins are built once into ``<finetune cache>/twins/<family>-<hash of this file's source>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)
WINDOW = 16  # sliding windows: shorter than every training sequence of the matrix, so the window really cuts


@dataclass(frozen=True)
class Family:
    name: str
    title: str                        # how people call it
    arch: str                         # transformers class (config.json "architectures")
    config: dict[str, Any]            # the scaled-down config, on top of TINY
    vocab: str                        # "bpe:<ggml-vocab name>", "spm:<ggml-vocab name>", "gemma4", "smollm2"
    template: str                     # models/templates/<name>.jinja ("" = the vocab's own)
    special: dict[str, str]           # bos/eos/pad/unk token texts of the real checkpoint
    generation: dict[str, Any]        # the real instruct checkpoint's sampling settings
    end_of_turn: str                  # the token that ends an assistant turn
    added: tuple[str, ...] = ()       # control tokens added on top of the vocabulary (stand-ins, added-only tokens)
    renames: dict[int, str] = field(default_factory=dict)  # spm: piece id -> control token text (stand-ins)
    tokenizer_class: str | None = None
    add_bos: bool | None = None       # the real tokenizer's add_bos_token, where it differs from the loader's default
    standin: str | None = None        # what is not the real family's, and why


def _layers(*kinds: str) -> dict[str, Any]:
    return {"num_hidden_layers": len(kinds), "layer_types": list(kinds)}


LLAMA3 = {"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
LLAMA3_SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}
QWEN_SPECIAL = {"eos": "<|im_end|>", "pad": "<|endoftext|>"}
HARMONY = ("<|startoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
           "<|call|>")
MISTRAL_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]")
TEKKEN_CONTROL = ("<unk>", "<s>", "</s>", *MISTRAL_CONTROL, "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                  "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3.1", "Llama 3.1 8B Instruct", "LlamaForCausalLM",
           {**_layers(*["full_attention"] * 2), **LLAMA3, "tie_word_embeddings": False},
           "bpe:llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", LLAMA3_SPECIAL,
           {"do_sample": True, "temperature": 0.6, "top_p": 0.9}, "<|eot_id|>"),
    Family("llama3.2", "Llama 3.2 1B/3B Instruct", "LlamaForCausalLM",
           {**_layers(*["full_attention"] * 2), **LLAMA3, "tie_word_embeddings": True},
           "bpe:llama-bpe", "meta-llama-Llama-3.2-3B-Instruct", LLAMA3_SPECIAL,
           {"do_sample": True, "temperature": 0.6, "top_p": 0.9}, "<|eot_id|>"),
    Family("qwen2.5", "Qwen2.5 0.5B-3B Instruct", "Qwen2ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
           "bpe:qwen2", "Qwen-Qwen2.5-7B-Instruct", QWEN_SPECIAL,
           {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
           "<|im_end|>"),
    Family("qwen3", "Qwen3 0.6B-4B", "Qwen3ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
           "bpe:qwen2", "Qwen-Qwen3-0.6B", QWEN_SPECIAL,
           {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}, "<|im_end|>"),
    Family("qwen3.5", "Qwen3.5 0.8B-9B (text model)", "Qwen3_5ForCausalLM",
           {**_layers("linear_attention", "linear_attention", "linear_attention", "full_attention"),
            "tie_word_embeddings": True, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4,
            "mtp_num_hidden_layers": 1, "head_dim": 32,
            # M-RoPE sections in rotary pairs, scaled with the head (real: head_dim 256, sections [11, 11, 10]):
            # llama.cpp asserts that they fit in the rotary dimensions.
            "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default",
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}},
           "bpe:qwen35", "Qwen3.5-4B", QWEN_SPECIAL,
           {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}, "<|im_end|>"),
    Family("smollm2", "SmolLM2 135M-1.7B Instruct", "LlamaForCausalLM",
           {**_layers(*["full_attention"] * 2), "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}},
           "smollm2", "", {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"},
           {"do_sample": True, "temperature": 0.2, "top_p": 0.9}, "<|im_end|>"),
    Family("smollm3", "SmolLM3 3B", "SmolLM3ForCausalLM",
           {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0], "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 5e6, "rope_type": "default"}},
           "bpe:llama-bpe", "HuggingFaceTB-SmolLM3-3B",
           {"bos": "<|begin_of_text|>", "eos": "<|im_end|>", "pad": "<|im_end|>"},
           {"do_sample": True, "temperature": 0.6, "top_p": 0.95}, "<|im_end|>",
           added=("<|im_start|>", "<|im_end|>"),
           standin="Llama 3's vocabulary as SmolLM3 uses it; <|im_start|>/<|im_end|> are added tokens here where the "
                   "real tokenizer renames two reserved Llama 3 tokens"),
    Family("phi3.5", "Phi-3.5 mini instruct", "Phi3ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": False, "sliding_window": 262144,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
           "spm:phi-3", "microsoft-Phi-3.5-mini-instruct",
           {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 0.7, "top_p": 0.9}, "<|end|>", tokenizer_class="LlamaTokenizer",
           add_bos=True),
    Family("phi4-mini", "Phi-4 mini instruct", "Phi3ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.75, "rope_type": "default"}},
           "bpe:gpt-2", "microsoft-Phi-3.5-mini-instruct",
           {"bos": "<|endoftext|>", "eos": "<|end|>", "pad": "<|endoftext|>"},
           {"do_sample": True, "temperature": 0.7, "top_p": 0.9}, "<|end|>",
           added=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
           tokenizer_class="GPT2Tokenizer",
           standin="llama.cpp keeps no o200k vocabulary: GPT-2's byte-level BPE (also GPT2Tokenizer, as Phi-4-mini "
                   "declares) plus Phi-4-mini's chat tokens; no Phi-4-mini template either: Phi-3.5's, same chat format"),
    Family("mistral-v0.3", "Mistral 7B Instruct v0.3", "MistralForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": False, "sliding_window": None,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
           "spm:llama-spm", "mistralai-Mistral-Nemo-Instruct-2407", {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 0.7, "top_p": 0.95}, "</s>",
           added=MISTRAL_CONTROL, tokenizer_class="LlamaTokenizer", add_bos=True,
           standin="Mistral v0.3's 32768-piece SentencePiece model is not in llama.cpp's source: Llama 2's SentencePiece "
                   "model (the one Mistral's extends) with v0.3's control tokens as added tokens; its template: Mistral "
                   "Nemo's ([INST] ... [/INST] answer</s>, the same format)"),
    Family("ministral3", "Ministral 3 / Mistral Small 3.2", "Ministral3ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": True, "sliding_window": None,
            "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 16384, "llama_4_scaling_beta": 0.1}},
           "bpe:gpt-2", "Mistral-Small-3.2-24B-Instruct-2506", {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 0.15, "top_p": 0.95}, "</s>", added=TEKKEN_CONTROL,
           standin="llama.cpp keeps no Tekken vocabulary: GPT-2's byte-level BPE plus Tekken's control tokens"),
    Family("gemma2", "Gemma 2 2B/9B it", "Gemma2ForCausalLM",
           {"num_hidden_layers": 2, "tie_word_embeddings": True, "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"], "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
           "spm:gemma-4", "google-gemma-2-2b-it", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 64}, "<end_of_turn>",
           renames={105: "<start_of_turn>", 106: "<end_of_turn>"}, tokenizer_class="GemmaTokenizer", add_bos=True,
           standin="llama.cpp keeps no Gemma 2 vocabulary: Gemma 4's pieces as a SentencePiece BPE model (scores from "
                   "the merge ranks), with <start_of_turn>/<end_of_turn> at ids 105/106 (Gemma 3's; Gemma 2's 106/107 "
                   "would replace the piece \"\\n\" that Gemma 4 keeps at 107, and without it Hugging Face's tokenizer "
                   "spells newlines as bytes where llama.cpp and SentencePiece merge them into \"\\n\\n\")"),
    Family("gemma3", "Gemma 3 1B/4B/12B it", "Gemma3ForCausalLM",
           {**_layers("sliding_attention", "sliding_attention", "sliding_attention", "full_attention"),
            "tie_word_embeddings": True, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
           "spm:gemma-4", "google-gemma-2-2b-it", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
           {"do_sample": True, "top_p": 0.95, "top_k": 64}, "<end_of_turn>",
           renames={105: "<start_of_turn>", 106: "<end_of_turn>"}, tokenizer_class="GemmaTokenizer", add_bos=True,
           standin="llama.cpp keeps no Gemma 3 vocabulary or template: Gemma 4's pieces as a SentencePiece BPE model "
                   "(scores from the merge ranks) with <start_of_turn>/<end_of_turn> at Gemma 3's ids 105/106, and "
                   "Gemma 2's template (Gemma 3's differs only in folding a system message into the first user turn)"),
    Family("gemma4", "Gemma 4 E2B/E4B/31B it (text)", "Gemma4ForCausalLM",
           {**_layers("sliding_attention", "sliding_attention", "sliding_attention", "full_attention"),
            "tie_word_embeddings": True, "sliding_window": WINDOW, "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 262144,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1e6}}},
           "gemma4", "google-gemma-4-31B-it", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 64}, "<turn|>",
           tokenizer_class="GemmaTokenizer",
           standin="the vocabulary is Gemma 4's own, read with gguf-py (transformers' GGUF loader cannot parse that "
                   "file's config) into the tokenizer.json a Gemma 4 checkpoint ships (BPE with byte fallback)"),
    # The small sizes' own structure: per-layer input embeddings, the last layers reusing earlier layers' keys and
    # values (num_kv_shared_layers), double-wide MLPs on those layers.
    Family("gemma4-e2b", "Gemma 4 E2B/E4B it (text: per-layer inputs, shared KV)", "Gemma4ForCausalLM",
           # E2B's pattern (sliding layers, then a full one) ending in a full layer before the shared ones, which
           # llama.cpp needs: its shared sliding/full layers reuse the two last unshared layers, in that order.
           {**_layers("sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                      "full_attention"),
            "tie_word_embeddings": True, "sliding_window": WINDOW, "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 262144, "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1e6}}},
           "gemma4", "google-gemma-4-31B-it", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
           {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 64}, "<turn|>",
           tokenizer_class="GemmaTokenizer",
           standin="the vocabulary is Gemma 4's own, read with gguf-py (transformers' GGUF loader cannot parse that "
                   "file's config) into the tokenizer.json a Gemma 4 checkpoint ships (BPE with byte fallback)"),
    Family("gpt-oss", "gpt-oss 20b", "GptOssForCausalLM",
           {**_layers("sliding_attention", "full_attention"), "tie_word_embeddings": False, "sliding_window": WINDOW,
            "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "attention_bias": True,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}},
           "bpe:gpt-2", "openai-gpt-oss-120b", {"bos": "<|startoftext|>", "eos": "<|return|>", "pad": "<|endoftext|>"},
           {"do_sample": True, "temperature": 1.0, "top_p": 1.0}, "<|return|>", added=HARMONY,
           standin="llama.cpp keeps no o200k_harmony vocabulary: GPT-2's byte-level BPE plus the harmony control tokens"),
    Family("granite4", "Granite 4.0 H (hybrid)", "GraniteMoeHybridForCausalLM",
           {**_layers("mamba", "attention", "mamba", "mamba"), "tie_word_embeddings": True,
            "num_local_experts": 0, "num_experts_per_tok": 0, "shared_intermediate_size": 128,
            "position_embedding_type": "nope", "mamba_n_heads": 8, "mamba_n_groups": 1, "mamba_d_state": 16,
            "mamba_d_head": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 16,
            "embedding_multiplier": 12.0, "logits_scaling": 2.0, "residual_multiplier": 0.22,
            "attention_multiplier": 0.0625, "pad_vocab_to": 8},
           "bpe:gpt-2", "ibm-granite-granite-4.0",
           {"bos": "<|end_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"},
           {"do_sample": True, "temperature": 0.7, "top_p": 0.9}, "<|end_of_text|>",
           added=("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>", "<|tool_call|>"),
           standin="llama.cpp keeps no Granite 4 vocabulary: GPT-2's byte-level BPE plus Granite's role tokens"),
    Family("lfm2", "LFM2 / LFM2.5 350M-2.6B", "Lfm2ForCausalLM",
           {**_layers("conv", "conv", "full_attention", "conv"), "tie_word_embeddings": True, "conv_L_cache": 3,
            "block_auto_adjust_ff_dim": False, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
           "bpe:gpt-2", "LFM2.5-Instruct", {"bos": "<|startoftext|>", "eos": "<|im_end|>", "pad": "<|pad|>"},
           {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "min_p": 0.15, "repetition_penalty": 1.05},
           "<|im_end|>", added=("<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>"),
           standin="llama.cpp keeps no LFM2 vocabulary: GPT-2's byte-level BPE plus LFM2's ChatML tokens"),
]}


# ------------------------------------------------------------------------------------------ build
def source_key(name: str) -> str:
    """Hash of this factory's source with only this family's entry of the table: editing one family (or adding
    one) rebuilds that twin, editing the builders rebuilds them all."""
    text = Path(__file__).read_text(encoding="utf-8")
    start, end = text.index("FAMILIES: dict"), text.index("# ---------------------------------------------------------------------------------------- build")
    return hashlib.sha256((text[:start] + text[end:] + repr(FAMILIES[name])).encode()).hexdigest()[:12]


def twin_dir(name: str) -> Path:
    from finetune.models import cache_root

    return cache_root() / "twins" / f"{name}-{source_key(name)}"


def llama_cpp_models() -> Path:
    from finetune.gguf import sdist

    return sdist.llama_cpp_dir() / "models"


def build(name: str, *, log=print) -> Path:
    """The twin's folder (built on first use)."""
    from filelock import FileLock

    from finetune.run import runs

    family = FAMILIES[name]
    out = twin_dir(name)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # processes building the same twin at once: one builds, the others wait
        if (out / "config.json").exists():
            return out
        log(f"twins: building {name}")
        with runs.atomic_dir(out) as tmp:
            tmp = Path(tmp)
            tokenizer = _tokenizer(family, tmp)
            _model(family, tokenizer, tmp)
    return out


def _model(family: Family, tokenizer, out: Path) -> None:
    import torch
    import transformers

    cls = getattr(transformers, family.arch)
    settings = {**TINY, **family.config}
    # Embedding rows padded past the tokenizer as the real checkpoint has them (Granite 4: 100352 rows; llama.cpp's
    # Mamba-2 converter pads the vocabulary to a multiple of 8 and expects the embedding to match).
    pad = settings.pop("pad_vocab_to", 1)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in family.special.items() if k != "unk"}
    config = cls.config_class(vocab_size=-(-len(tokenizer) // pad) * pad, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                              pad_token_id=ids.get("pad"), **settings)
    for key in ("mtp_num_hidden_layers",):  # declared by the real config.json, unknown to the config class
        if key in settings:
            setattr(config, key, settings[key])
    config.architectures = [family.arch]
    torch.manual_seed(0)
    model = cls(config).to(torch.bfloat16)  # real checkpoints ship bf16
    model.save_pretrained(out, safe_serialization=True)
    if "layer_types" in settings:  # as the real config.json spells them (transformers 5 renames Granite's on save)
        saved = json.loads((out / "config.json").read_text())
        saved["layer_types"] = settings["layer_types"]
        (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    eos = list(dict.fromkeys([eot] + ([ids["eos"]] if ids.get("eos") is not None else [])))
    generation = {**family.generation, "bos_token_id": ids.get("bos"), "eos_token_id": eos,
                  "pad_token_id": ids.get("pad")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _template(family: Family) -> str | None:
    if not family.template:
        return None
    return (llama_cpp_models() / "templates" / f"{family.template}.jinja").read_text(encoding="utf-8")


def _tokenizer(family: Family, out: Path):
    from transformers import AddedToken, AutoTokenizer

    from finetune.merge import save_tokenizer

    kind, _, vocab = family.vocab.partition(":")
    if kind == "bpe":
        tok = AutoTokenizer.from_pretrained(llama_cpp_models(), gguf_file=f"ggml-vocab-{vocab}.gguf")
    elif kind == "smollm2":
        from finetune.models import embedded_gguf_path

        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    elif kind == "spm" and not family.renames:
        # tokenizer.model for llama.cpp's converter; tokenizer.json from transformers' GGUF loader, which rebuilds
        # the real one (Phi-3: all 47 of llama.cpp's test strings tokenize as the real tokenizer does; one made by
        # converting tokenizer.model with transformers 5 got 10 wrong, on leading spaces).
        _write_sentencepiece(family, llama_cpp_models() / f"ggml-vocab-{vocab}.gguf", out)
        tok = AutoTokenizer.from_pretrained(llama_cpp_models(), gguf_file=f"ggml-vocab-{vocab}.gguf")
    elif kind == "spm":
        _write_sentencepiece(family, llama_cpp_models() / f"ggml-vocab-{vocab}.gguf", out)
        tok = _load_from(out, family)
    elif kind == "gemma4":
        control = _write_gemma4_tokenizer_json(llama_cpp_models() / "ggml-vocab-gemma-4.gguf", out)
        tok = _load_from(out, family, extra_special=[t for t in control if t not in family.special.values()])
    else:
        raise ValueError(family.vocab)
    extra = out / ".extra_tokens.json"
    control = [t for _, t in json.loads(extra.read_text())] if extra.exists() else []
    extra.unlink(missing_ok=True)
    # Control tokens are special added tokens, as in the real tokenizer_config.json's added_tokens_decoder (also the
    # ones already in the vocabulary: added_tokens.json alone does not make them special).
    control += [t for t in family.added if t not in control]
    if control:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in control], special_tokens=True)
    if family.add_bos is not None:
        tok.add_bos_token = family.add_bos
    for key, text in family.special.items():
        setattr(tok, f"{key}_token", text)
    template = _template(family)
    if template is not None:
        tok.chat_template = template
    # With added_tokens_decoder in tokenizer_config.json, as real checkpoints have it (transformers 5 does not write
    # it; the converter reads it for tokens past tokenizer.model): export's own tokenizer saving does both.
    save_tokenizer(tok, out, sources=[])
    if kind == "spm" and not family.renames:
        _legacy_sentencepiece_json(out, rstrip=[t for t in control if t != family.special.get("eos")])
    if family.tokenizer_class:
        cfg_file = out / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["tokenizer_class"] = family.tokenizer_class
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return AutoTokenizer.from_pretrained(out)


def _load_from(folder: Path, family: Family, *, extra_special: list[str] | None = None):
    from transformers import AutoTokenizer

    cfg = {"tokenizer_class": family.tokenizer_class, **{f"{k}_token": v for k, v in family.special.items()}}
    if extra_special:
        cfg["extra_special_tokens"] = extra_special
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return AutoTokenizer.from_pretrained(folder)


def _legacy_sentencepiece_json(out: Path, *, rstrip: list[str]) -> None:
    """tokenizer.json as Llama 2 / Mistral v0.3 / Phi-3.5 ship it: "▁" prepended to every text segment by the
    normalizer (also after a special token and before leading spaces: what SentencePiece's add_dummy_prefix does,
    and llama.cpp), no Metaspace pre-tokenizer; Phi-3.5's chat tokens strip the whitespace after them (rstrip)."""
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    spec["pre_tokenizer"] = None
    for token in spec["added_tokens"]:
        if token["content"] in rstrip and not token["content"].startswith("["):  # Mistral's [INST] keep theirs
            token["rstrip"] = True
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    for item in (cfg.get("added_tokens_decoder") or {}).values():
        if item["content"] in rstrip and not item["content"].startswith("["):
            item["rstrip"] = True
    cfg["legacy"] = True
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_vocab(gguf_file: Path) -> dict[str, Any]:
    """tokens, scores, types (and merges) of a vocab-only GGUF, from its header (finetune.gguf.header)."""
    from finetune.gguf import header

    meta = header.read(gguf_file, tensors=False).metadata
    return {key: meta.get(f"tokenizer.ggml.{name}") or [] for key, name in
            (("tokens", "tokens"), ("scores", "scores"), ("types", "token_type"), ("merges", "merges"))}


def _write_sentencepiece(family: Family, gguf_file: Path, out: Path) -> None:
    """tokenizer.model from a vocab GGUF: its pieces with their scores and types. Control tokens past the
    SentencePiece model (Phi-3's 32000+) stay out of it: the real checkpoints have them as added tokens only."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = _read_vocab(gguf_file)
    tokens, types = vocab["tokens"], vocab["types"]
    scores = vocab["scores"]
    bpe = bool(vocab["merges"])
    if bpe:  # a BPE vocabulary without scores (Gemma 4): SentencePiece BPE merges by score, so score = -rank
        rank = {}
        for i, merge in enumerate(vocab["merges"]):
            left, right = merge.split(" ", 1)
            rank.setdefault(left + right, i)
        scores = [-float(rank.get(t, len(rank) + i)) if types[i] == 1 else 0.0 for i, t in enumerate(tokens)]
    for i, text in family.renames.items():
        tokens[i], types[i] = text, 3
    n_model = len(tokens)
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    if family.vocab == "spm:phi-3":
        n_model = 32000
    m = pb.ModelProto()
    kind = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
            3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
            5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for i in range(n_model):
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = tokens[i], scores[i], kind[types[i]]
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n_model
    spec.byte_fallback = True
    spec.split_digits = bpe  # Gemma splits digits; Llama 2/Phi-3 do not
    spec.unk_id, spec.bos_id, spec.eos_id = tokens.index("<unk>"), tokens.index("<s>" if "<s>" in tokens else "<bos>"), \
        tokens.index("</s>" if "</s>" in tokens else "<eos>")
    spec.pad_id = tokens.index("<pad>") if "<pad>" in tokens[:n_model] else -1
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = not bpe  # Llama 2/Phi-3 prepend a space; Gemma does not
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    (out / "tokenizer.model").write_bytes(m.SerializeToString())
    extra = [(i, tokens[i]) for i in range(n_model, len(tokens))]
    if extra:  # Phi-3: <|endoftext|>, <|assistant|>, ..., <|end|>: added tokens of the real checkpoint
        (out / "added_tokens.json").write_text(json.dumps({t: i for i, t in extra}, indent=2) + "\n")
        (out / ".extra_tokens.json").write_text(json.dumps(extra))


def _write_gemma4_tokenizer_json(gguf_file: Path, out: Path) -> list[str]:
    """The tokenizer.json a Gemma 4 checkpoint ships: BPE over '▁'-escaped text with byte fallback and the
    vocabulary's control tokens as added tokens; returns the control tokens' texts, which the tokenizer must name
    as special tokens: llama.cpp's Gemma 4 converter marks a token CONTROL only when it is among the tokenizer's
    special ids (the vocabulary llama.cpp keeps, converted from the real checkpoint, has all 17 so); as plain added
    tokens they were NORMAL in the GGUF, and llama.cpp spelt "<|turn>" as "<", "|", "turn", ">"."""
    vocab = _read_vocab(gguf_file)
    tokens, types = vocab["tokens"], vocab["types"]
    merges = [m.split(" ", 1) for m in vocab["merges"]]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == 3} for i, t in enumerate(tokens) if types[i] in (3, 4)]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return [t for i, t in enumerate(tokens) if types[i] == 3]


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = argv or list(FAMILIES)
    for name in names:
        print(name, build(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

