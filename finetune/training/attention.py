"""Attention for padding-free (packed) batches, registered through transformers' AttentionInterface.

A packed row holds several examples one after another. transformers' sdpa/eager paths handle that by building
a dense block-diagonal mask over the whole row (and silently skip it when a cache is active), so
attention costs (sum of lengths)^2. This function costs sum(length^2) and never materialises a mask: the same
maths as padded batches, without the padding.

- CUDA, bf16/fp16: one variable-length flash-attention kernel per layer (``torch.nn.attention.varlen``, in torch
  since 2.10: what the flash-attn package does, without installing it).
- CPU: causal attention on each example in turn, in eager maths (faster than SDPA's CPU kernel here);
- otherwise (CUDA fp32, older torch, dropout): causal SDPA on each example in turn.
``flash_attention_2`` (CUDA, when the flash-attn package is installed) is preferred by train when present.
"""

from __future__ import annotations

import functools
import inspect

NAME = "finetune_varlen"


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """query/key/value: [batch, heads, seq, head_dim] -> ([batch, seq, heads, head_dim], None).

    Honours what the architectures pass to their attention function: ``sliding_window`` (Mistral, Gemma 2/3,
    gpt-oss: a token sees itself and the window-1 tokens before it, as transformers' masks do), ``softcap``
    (Gemma 2: tanh-capped scores) and ``s_aux`` (gpt-oss: a learned per-head "sink" logit that takes part in the
    softmax and is then dropped)."""
    import torch
    import torch.nn.functional as F

    if query.shape[0] != 1:
        # transformers builds no mask for a registered custom attention, so a padded batch would attend to padding
        raise RuntimeError(f"{NAME} attention takes packed batches (one row); got {query.shape[0]} rows")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        # repeat_kv instead of enable_gqa: works on every torch >= 2.4 backend, forward and backward
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    varlen = _torch_varlen()
    cu = kwargs.get("cu_seq_lens_q")
    default_scale = scaling is None or abs(scaling - query.shape[-1] ** -0.5) < 1e-9
    window = int(sliding_window) if sliding_window else None
    # The flash kernel has no sinks and no soft-capping; a window only where it takes window_size.
    kernel_ok = s_aux is None and softcap is None and (window is None or (varlen is not None and varlen[3]))
    if (varlen is not None and kernel_ok and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and p == 0.0 and cu is not None and kwargs.get("max_length_q") is not None and (varlen[2] or default_scale)):
        attn, causal, takes_scale, _ = varlen
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, head_dim]
        longest = int(kwargs["max_length_q"])
        cu = cu.to(device=query.device, dtype=torch.int32)
        extra = {"scale": scaling} if takes_scale and scaling is not None else {}
        if window is not None:
            causal = {"window_size": (window - 1, 0)}
        out = attn(q, k, v, cu, cu, longest, longest, **causal, **extra)
        return out.unsqueeze(0), None
    bounds = _boundaries(kwargs, query.shape[2])
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
    # split (not slicing): its backward concatenates the gradients instead of zero-filling a full tensor per example
    parts = zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2), strict=True)
    if (query.device.type == "cpu" and p == 0.0) or window is not None or softcap is not None or s_aux is not None:
        # On a CPU the eager maths (transformers' "eager" attention: scores in the model dtype, softmax in fp32) is
        # about a third faster than SDPA's CPU flash kernel forward+backward at these lengths (2 cores, bf16).
        # Windows, soft-capping and sinks take the eager maths on every device.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        outs = [_causal_eager(q, k, v, scale, window=window, softcap=softcap, sinks=s_aux, dropout=p)
                for q, k, v in parts]
    else:
        outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling)
                for q, k, v in parts]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _causal_eager(query, key, value, scale: float, *, window: int | None = None, softcap: float | None = None,
                  sinks=None, dropout: float = 0.0):
    import torch

    n = query.shape[2]
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    hidden = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
    if window is not None and n > window:
        hidden |= torch.ones(n, n, dtype=torch.bool, device=query.device).tril_(-window)
    scores = scores.masked_fill_(hidden, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        # gpt-oss: the sink is one more logit per head in the softmax; its probability mass is then dropped
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, n, 1)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = combined.softmax(dim=-1)[..., :-1]
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs.to(value.dtype), value)


@functools.cache
def _torch_varlen():
    """(varlen_attn, keyword arguments for causal attention, whether it takes ``scale``, whether it takes a
    ``window_size``) when this torch has the variable-length flash kernel (its keywords changed between torch
    releases), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
    except (ImportError, ValueError, TypeError):
        return None
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}, "scale" in params, True
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}, "scale" in params, False
    return None


def _boundaries(kwargs, seq_len: int) -> list[int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[0] == 1:
        # a packed row without boundaries: an example starts wherever the position restarts at 0
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if starts and starts[0] == 0:
            return starts + [seq_len]
    return [0, seq_len]  # one ordinary causal sequence (generation without a cache, batch of one)


# Layers that mix tokens by attention and so can be told where each packed example starts. Any other kind
# (Qwen3.5's gated-delta "linear_attention", Granite 4's mamba, LFM2's "conv") runs over the whole packed row as one
# sequence: one example's state would flow into the next.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
RECURRENT_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "jamba", "falcon_h1", "bamba", "zamba", "zamba2",
                         "nemotron_h", "recurrent_gemma", "xlstm", "lfm2", "lfm2_moe"}


def packing_obstacle(config) -> str | None:
    """Why padding-free packed batches would mix examples in this model, or None when they are safe.

    ``config``: a transformers config (image-text models: their text config is read)."""
    text = getattr(config, "text_config", None) or config
    types = getattr(text, "layer_types", None) or []
    other = sorted({str(t) for t in types} - ATTENTION_LAYER_TYPES)
    if other:
        return (f"its {', '.join(other)} layers run over a packed row as one sequence (only attention layers can "
                "keep packed examples apart)")
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if model_type in RECURRENT_MODEL_TYPES:
        return f"{model_type} layers carry state along the row, so packed examples would leak into each other"
    return None


def register() -> str:
    """Make ``attn_implementation=NAME`` available to every transformers model; returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_attention)
    return NAME
