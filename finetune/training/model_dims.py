"""The shapes of a decoder that decide its training memory, read from config.json alone: ``ModelDims``.

Most decoders repeat one layer (``linear_shapes``). Some mix kinds of layers, and ``layer_groups`` lists each kind
with its linear modules: Qwen3.5's gated-delta layers beside its gated attention, Gemma 4's sliding and global
attention (different head sizes), its KV-shared layers (no k/v projections; on E2B, twice as wide an MLP) and its
per-layer embeddings. The counts are checked against transformers' own modules and peft's LoRA in
tests/unit/test_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from finetune.errors import UserError

Shapes = dict[str, tuple[int, int]]  # linear module name -> (in_features, out_features)
Modules = tuple[tuple[str, int, int], ...]  # the same, frozen: (name, in_features, out_features)


@dataclass(frozen=True)
class ModelDims:
    """The shapes of a decoder-only transformer that decide its memory (read from config.json)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    logit_softcapping: bool = False  # Gemma 2: tanh capping of the final logits and attention scores
    # Mixture of experts (gpt-oss, Mixtral, Qwen3-MoE): every expert is held in memory, ``experts_per_token`` of them
    # compute for each token. transformers keeps the experts (and the router) as fused weight tensors, not linear
    # layers: LoRA's all-linear does not reach them and bitsandbytes does not quantize them.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    # Decoders whose layers differ (Qwen3.5, Gemma 4): per kind of layer, how many and their linear modules; empty
    # when every layer has linear_shapes(). ``recurrent_layers``: layers without softmax attention over the sequence
    # (Qwen3.5's gated-delta layers). ``model_linear``: linear modules outside the layers, which LoRA's all-linear
    # adapts too (Gemma 4's per-layer input projection). ``extra_params``: other weights (Gemma 4's per-layer
    # embedding table and its extra norms; the gated-delta layers' conv, decay and gated norm).
    layer_kinds: tuple[tuple[int, Modules], ...] = ()
    recurrent_layers: int = 0
    model_linear: Modules = ()
    extra_params: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelDims:
        cfg = config.get("text_config") or config  # multimodal configs nest the language model
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            dims = cls(
                model_type=str(cfg.get("model_type", config.get("model_type", "unknown"))),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get(
                    "tie_word_embeddings", _default_tie(str(cfg.get("model_type") or config.get("model_type")))))),
                max_position_embeddings=cfg.get("max_position_embeddings"),
                logit_softcapping=bool(cfg.get("final_logit_softcapping")),
                **_experts(cfg),
            )
            return replace(dims, **_layer_kinds(cfg, dims))
        except KeyError as exc:
            raise UserError(
                f"model config: no {exc.args[0]!r} in config.json; the planner reads decoder-only transformer configs "
                "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)"
            ) from None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and self.experts_per_token > 0

    @property
    def expert_params(self) -> int:
        """Per decoder layer: every expert's gate, up and down projections, and the router."""
        if not self.is_moe:
            return 0
        return self.num_experts * 3 * self.hidden_size * self.expert_intermediate_size + self.num_experts * self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters that compute for one token, as model cards count them: the routed experts only, and without
        the input embedding (a lookup)."""
        idle = self.num_experts - self.experts_per_token
        return self.total_params - self.embedding_params - (
            self.num_layers * idle * 3 * self.hidden_size * self.expert_intermediate_size if self.is_moe else 0)

    @property
    def fused_projections(self) -> bool:
        """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj (LoRA targets differ)."""
        return self.model_type in ("phi3", "phimoe")

    def linear_shapes(self) -> Shapes:
        """Per decoder layer (where the layers differ, those of the first kind: layer_groups has every kind)."""
        if self.layer_kinds:
            return _shapes(self.layer_kinds[0][1])
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        if self.is_moe:  # the MLP is the experts (fused tensors, not linear layers): attention only
            return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.fused_projections:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_groups(self) -> list[tuple[int, Shapes]]:
        """(number of decoder layers, their linear modules) for each kind of layer."""
        if self.layer_kinds:
            return [(n, _shapes(modules)) for n, modules in self.layer_kinds]
        return [(self.num_layers, self.linear_shapes())]

    @property
    def layer_linear_params(self) -> int:
        """Per decoder layer (of the first kind; linear_params for the whole model)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def linear_params(self) -> int:
        """Every linear layer's weights but the output layer's: what QLoRA quantizes."""
        return (sum(n * sum(a * b for a, b in shapes.values()) for n, shapes in self.layer_groups())
                + sum(a * b for _, a, b in self.model_linear))

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        norms_per_layer = 4 if self.model_type.startswith("gemma2") else 2
        return self.num_layers * norms_per_layer * self.hidden_size + self.hidden_size

    @property
    def total_params(self) -> int:
        """Parameter count (biases and q/k norms left out: < 0.1% for the models we ship)."""
        return (self.embedding_params + self.lm_head_params + self.norm_params + self.linear_params
                + self.num_layers * self.expert_params + self.extra_params)

    def lora_target_groups(self, target_modules: str | list[str]) -> list[tuple[int, Shapes]]:
        """The linear modules a LoRA target spec adapts ('all-linear' = every linear but lm_head), per kind of
        decoder layer as in layer_groups (lora_model_targets: those outside the layers)."""
        groups = [(n, _chosen(shapes, target_modules)) for n, shapes in self.layer_groups()]
        if not any(chosen for _, chosen in groups) and not self.lora_model_targets(target_modules):
            modules = dict.fromkeys(name for _, shapes in self.layer_groups() for name in shapes)
            names = target_modules if isinstance(target_modules, list) else [target_modules]
            raise UserError(
                f"train.lora.target_modules: none of {names} is a linear layer of this {self.model_type} model; "
                f"its layers have {', '.join(modules)} (or use 'all-linear')"
            )
        return groups

    def lora_model_targets(self, target_modules: str | list[str]) -> Shapes:
        """The linear modules outside the decoder layers (model_linear) a LoRA target spec adapts."""
        return _chosen(_shapes(self.model_linear), target_modules)

    def lora_targets(self, target_modules: str | list[str]) -> Shapes:
        """The modules a LoRA target spec adapts in a decoder layer (of the first kind: lora_target_groups)."""
        return self.lora_target_groups(target_modules)[0][1]


def _shapes(modules: Modules) -> Shapes:
    return {name: (a, b) for name, a, b in modules}


def _chosen(shapes: Shapes, target_modules: str | list[str]) -> Shapes:
    if target_modules == "all-linear":
        return shapes
    names = target_modules if isinstance(target_modules, list) else [target_modules]
    return {name: shape for name, shape in shapes.items() if any(name == t or name.endswith(t) for t in names)}


def _default_tie(model_type: str) -> bool:
    """Whether the architecture ties its output layer to the embeddings when config.json does not say (SmolLM3's
    omits the key): transformers' own default for the model type, as loading the model would use."""
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except (ValueError, KeyError, TypeError, ImportError):
        return False


def _experts(cfg: dict[str, Any]) -> dict[str, int]:
    """The mixture-of-experts shape of a config: experts per layer, experts per token, each expert's MLP width
    (``moe_intermediate_size`` where the config has both it and a dense ``intermediate_size``)."""
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    per_token = int(cfg.get("num_experts_per_tok") or 0)
    if not (experts and per_token):
        return {}
    width = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    return {"num_experts": experts, "experts_per_token": per_token, "expert_intermediate_size": width}


# ------------------------------------------------------------------------------------ decoders of mixed layers
def _layer_kinds(cfg: dict[str, Any], dims: ModelDims) -> dict[str, Any]:
    """The ModelDims fields of a decoder whose layers differ, as transformers builds them; {} for the others."""
    model_type = dims.model_type
    if model_type.startswith("qwen3_5"):
        return _qwen3_5(cfg, dims)
    if model_type.startswith("gemma4") and cfg.get("layer_types") and not cfg.get("enable_moe_block"):
        return _gemma4(cfg, dims)
    return {}


def _mlp(dims: ModelDims, width: int) -> Modules:
    h = dims.hidden_size
    return () if dims.is_moe else (("gate_proj", h, width), ("up_proj", h, width), ("down_proj", width, h))


def _qwen3_5(cfg: dict[str, Any], dims: ModelDims) -> dict[str, Any]:
    """Qwen3.5: attention layers whose q_proj also computes a per-head output gate (twice the width), and
    ``layer_types`` "linear_attention" layers that mix tokens with a gated delta rule (in_proj_qkv/z/b/a and
    out_proj around a depthwise conv over q, k and v; per-head decay and time-step bias; a gated norm)."""
    h, q, kv = dims.hidden_size, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    mlp = _mlp(dims, dims.intermediate_size)
    recurrent = sum(1 for kind in cfg.get("layer_types") or [] if kind == "linear_attention")
    kinds = [(dims.num_layers - recurrent, (("q_proj", h, 2 * q), ("k_proj", h, kv), ("v_proj", h, kv),
                                            ("o_proj", q, h)) + mlp)]
    extra = 0
    if recurrent:
        key_heads, value_heads = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
        keys, values = key_heads * int(cfg["linear_key_head_dim"]), value_heads * int(cfg["linear_value_head_dim"])
        kinds.append((recurrent, (("in_proj_qkv", h, 2 * keys + values), ("in_proj_z", h, values),
                                  ("in_proj_b", h, value_heads), ("in_proj_a", h, value_heads),
                                  ("out_proj", values, h)) + mlp))
        extra = recurrent * ((2 * keys + values) * int(cfg["linear_conv_kernel_dim"]) + 2 * value_heads
                             + int(cfg["linear_value_head_dim"]))
    return {"layer_kinds": tuple(kinds), "recurrent_layers": recurrent, "extra_params": extra}


def _gemma4(cfg: dict[str, Any], dims: ModelDims) -> dict[str, Any]:
    """Gemma 4 (dense): "full_attention" layers with their own head size and KV heads; the last
    ``num_kv_shared_layers`` layers reuse earlier layers' keys and values (no k/v projections) and, with
    ``use_double_wide_mlp``, have twice as wide an MLP; every layer gates in a per-layer input (per-layer
    embeddings: a second embedding table of hidden_size_per_layer_input per layer, projected from the hidden state
    by a linear layer outside the layers). Four norms per layer."""
    h, heads, layers = dims.hidden_size, dims.num_heads, dims.num_layers
    per_layer = int(cfg.get("hidden_size_per_layer_input") or 0)
    first_shared = layers - int(cfg.get("num_kv_shared_layers") or 0)
    counts: dict[Modules, int] = {}
    for index, kind in enumerate(cfg["layer_types"][:layers]):
        full, shared = kind == "full_attention", index >= first_shared
        head_dim = int(cfg.get("global_head_dim") or dims.head_dim) if full else dims.head_dim
        kv = (int(cfg.get("num_global_key_value_heads") or dims.num_kv_heads) if full else dims.num_kv_heads) * head_dim
        modules: Modules = (("q_proj", h, heads * head_dim),)
        if not shared:
            modules += (("k_proj", h, kv),) + (() if full and cfg.get("attention_k_eq_v") else (("v_proj", h, kv),))
        modules += (("o_proj", heads * head_dim, h),)
        modules += _mlp(dims, dims.intermediate_size * (2 if shared and cfg.get("use_double_wide_mlp") else 1))
        if per_layer:
            modules += (("per_layer_input_gate", h, per_layer), ("per_layer_projection", per_layer, h))
        counts[modules] = counts.get(modules, 0) + 1
    extra = layers * 2 * h  # pre- and post-feed-forward norms (norm_params counts two per layer)
    if per_layer:  # the per-layer embedding table, each layer's post-per-layer-input norm, the projection's norm
        extra += int(cfg.get("vocab_size_per_layer_input") or dims.vocab_size) * layers * per_layer
        extra += layers * h + per_layer
    model_linear = (("per_layer_model_projection", h, layers * per_layer),) if per_layer else ()
    return {"layer_kinds": tuple((n, modules) for modules, n in counts.items()), "model_linear": model_linear,
            "extra_params": extra}
