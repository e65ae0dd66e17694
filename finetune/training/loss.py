"""The log-probabilities of the trained tokens without building the logits at tokens x vocabulary.

A 262k-token vocabulary (Gemma 3/4; Qwen 151k, gpt-oss 201k) makes the logits the largest tensor of a training
step: at 2k tokens, 2 GiB per fp32 copy, and the loss keeps several (the head's output, its fp32 upcast, the
log-softmax, the gradient). Here the model runs as usual up to its output layer; a forward pre-hook on that layer
takes the final hidden states of the positions whose next token is trained, and

- ``TrainedLogps`` (an autograd Function) projects them onto the vocabulary a chunk of tokens at a time
  (``chunk_tokens``: about ``CHUNK_LOGITS`` logits at once), applying the family's transform of the logits (Gemma
  2/3/4's final soft-capping, Granite's division, Cohere's scale), and keeps one log-probability per token. When the
  head's weights are frozen (LoRA, DoRA, QLoRA) the forward pass also keeps each token's gradient with respect to its
  hidden state (d log p / d h: hidden-size numbers a token), so the backward pass is one multiplication and costs no
  second projection; when they train (full fine-tuning, tied embeddings) the backward pass recomputes the logits
  chunk by chunk.
- on CUDA with liger-kernel installed, the SFT loss (a sum, no per-token values) is Liger's fused linear
  cross-entropy instead, which does the same in Triton.

The output layer then runs on no position at all. Inside the model's own forward call (the hook runs after FSDP2's
gathering of the head's weights), this works unchanged through DDP, FSDP2 and peft wrappers; under FSDP2 a trained
head (full fine-tuning) takes the full logits, as its sharded weights are not gathered again for this backward.

It applies to the causal LM classes in ``HEADS`` (each checked against the full logits by
tests/unit/test_train_loss_chunked.py) whose output layer is an ``nn.Linear``; other classes (remote code)
and an adapted head (LoRA on lm_head, modules_to_save) take the full-logits path, ``full_logps``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

from finetune.data.render import IGNORE_INDEX

# Logits computed at a time (tokens of a chunk x vocabulary): 128 MiB in fp32. With a 262k vocabulary that is 128
# tokens a chunk, with SmolLM2's 49k 682 tokens.
CHUNK_LOGITS = 2**25

# What each transformers class does to its output layer's result before returning the logits (transformers 5:
# read from each class's forward). "plain": nothing.
_PLAIN = ("LlamaForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM", "Mistral3ForConditionalGeneration",
          "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
          "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "SmolLM3ForCausalLM", "Phi3ForCausalLM",
          "GptOssForCausalLM", "Lfm2ForCausalLM", "Gemma3ForConditionalGeneration", "OlmoForCausalLM",
          "Olmo2ForCausalLM")
HEADS: dict[str, str] = {
    **dict.fromkeys(_PLAIN, "plain"),
    # logits = cap * tanh(logits / cap), cap = final_logit_softcapping (of the text config)
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma4ForCausalLM",
                     "Gemma4ForConditionalGeneration"), "softcap"),
    # logits = logits / config.logits_scaling
    **dict.fromkeys(("GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM",
                     "GraniteMoeHybridForCausalLM"), "divide"),
    # logits = logits * model.logit_scale
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM"), "multiply"),
}


def chunk_tokens(vocab_size: int) -> int:
    """Tokens projected onto the vocabulary at a time."""
    return max(1, CHUNK_LOGITS // max(1, vocab_size))


def chunkable_architecture(architectures: list[str] | None) -> bool:
    """Whether a config.json's ``architectures`` name a class whose loss is computed in chunks (the planner)."""
    return bool(architectures) and architectures[0] in HEADS


@dataclass(frozen=True)
class Head:
    """A model's output layer and the transform its class applies to the logits."""

    linear: Any                    # the nn.Linear that projects hidden states onto the vocabulary
    softcap: float | None = None   # logits = softcap * tanh(logits / softcap)
    divide: float | None = None    # logits = logits / divide
    multiply: float | None = None  # logits = logits * multiply


def head_of(model) -> Head | None:
    """The output layer of ``model`` (through DDP and peft wrappers) when its class is in ``HEADS`` and the layer is
    a plain ``nn.Linear``; None otherwise (the full-logits path)."""
    import torch

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    # FSDP2 swaps the class for a subclass of it: look along the class hierarchy
    kind = next((HEADS[c.__name__] for c in type(base).__mro__ if c.__name__ in HEADS), None)
    linear = base.get_output_embeddings() if kind is not None else None
    if linear is None or not isinstance(linear, torch.nn.Linear):  # adapted: peft's own layer, modules_to_save
        return None
    if type(linear) is not torch.nn.Linear and linear.weight.requires_grad:
        # its own FSDP2 unit (accelerate shards lm_head apart): its weights are gathered for its forward call only,
        # while a trained head's gradient would need them again in backward
        return None
    config = base.config
    if kind == "softcap":
        return Head(linear, softcap=config.get_text_config().final_logit_softcapping)
    if kind == "divide":
        return Head(linear, divide=float(config.logits_scaling))
    if kind == "multiply":
        return Head(linear, multiply=float(base.logit_scale))
    return Head(linear)


# --------------------------------------------------------------------------------------------- the entry points
def trained_logps(model, inputs: dict[str, Any], targets, *, logits_to_keep=None, chunked: bool = True):
    """Log-probabilities (fp32) of the trained next tokens under ``model`` run on ``inputs``.

    ``targets``: the next token at each position the output layer sees (``logits_to_keep`` picks them; all positions
    without it), ``IGNORE_INDEX`` where not trained, shape (rows, positions). Returns one value per trained position,
    in row-major order. ``chunked=False``: the full-logits computation (the reference the tests and the benchmark
    compare with)."""
    head = head_of(model) if chunked else None
    if head is None:
        return full_logps(_forward(model, inputs, logits_to_keep).logits, targets)
    return _through_head(model, inputs, logits_to_keep, head, lambda h: _chunked_logps(h, targets, head))


def nll_sum(model, inputs: dict[str, Any], targets, *, logits_to_keep=None, chunked: bool = True):
    """Sum of the trained tokens' negative log-likelihood (the SFT loss before normalisation); Liger's fused linear
    cross-entropy where it applies (CUDA, liger-kernel installed), else ``-trained_logps(...).sum()``."""
    head = head_of(model) if chunked else None
    if head is not None and _liger_applies(targets):
        return _through_head(model, inputs, logits_to_keep, head, lambda h: _liger_nll_sum(h, targets, head))
    return -trained_logps(model, inputs, targets, logits_to_keep=logits_to_keep, chunked=chunked).sum()


def full_logps(logits, targets):
    """The full-logits computation: every logit of every position the head saw, upcast, then cross-entropy."""
    import torch.nn.functional as F

    flat = _upcast(logits).reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(flat, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    return -losses[flat_targets != IGNORE_INDEX]


def _forward(model, inputs, logits_to_keep):
    kw = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    return model(**inputs, **kw, use_cache=False)


def _through_head(model, inputs, logits_to_keep, head: Head, compute):
    """Run the model; at its output layer, ``compute(hidden states)`` instead, and the layer sees no position."""
    result = []

    def pre_hook(_module, args):
        hidden = args[0]
        result.append(compute(hidden))
        return (hidden[..., :0, :], *args[1:])

    handle = head.linear.register_forward_pre_hook(pre_hook)
    try:
        _forward(model, inputs, logits_to_keep)
    finally:
        handle.remove()
    if len(result) != 1:
        raise RuntimeError(f"{type(model).__name__}: the output layer ran {len(result)} times in one forward pass; "
                           "the chunked loss expects once")
    return result[0]


def _selected(hidden, targets):
    """(hidden states, targets) of the trained positions, flattened; a graph-connected empty result when none."""
    import torch

    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat.device)
    if flat.shape[0] != flat_targets.shape[0]:
        raise ValueError(f"targets for {flat_targets.shape[0]} positions, but the output layer sees {flat.shape[0]}")
    keep = (flat_targets != IGNORE_INDEX).nonzero().flatten()
    if keep.numel() == flat.shape[0]:
        return flat, flat_targets, False
    if keep.numel() == 0:  # still a graph through the whole model (data-parallel processes expect every gradient)
        return flat[:1], torch.zeros(1, dtype=flat_targets.dtype, device=flat.device), True
    return flat.index_select(0, keep), flat_targets[keep], False


def _upcast(x):
    """fp32 for the softmax (or float64 where the model computes in it)."""
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))


def _compute_dtype(weight):
    import torch

    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunked_logps(hidden, targets, head: Head):
    import torch

    sel, sel_targets, empty = _selected(hidden, targets)
    weight, bias = head.linear.weight, head.linear.bias
    chunk, dtype = chunk_tokens(weight.shape[0]), _compute_dtype(weight)
    if torch.is_grad_enabled():
        logps = _function().apply(sel, weight, bias, sel_targets, head, chunk, dtype)
    else:  # validation, reference log-probabilities: no gradient to prepare
        logps = torch.cat([_chunk_pass(sel[s:s + chunk], weight, bias, sel_targets[s:s + chunk], head, dtype,
                                       False)[0] for s in range(0, sel.shape[0], chunk)])
    return logps[:0] if empty else logps


# ------------------------------------------------------------------------------------- the chunked projection
def _logits(hidden, weight, bias, head: Head, dtype):
    """fp32 logits of a chunk after the family's transform, and d(logits)/d(projection) (None: 1 everywhere)."""
    import torch
    import torch.nn.functional as F

    z = _upcast(F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)))
    factor = 1.0
    if head.divide is not None:
        z = z / head.divide
        factor /= head.divide
    if head.multiply is not None:
        z = z * head.multiply
        factor *= head.multiply
    if head.softcap is None:
        return z, (None if factor == 1.0 else factor)
    z = torch.tanh(z / head.softcap) * head.softcap
    return z, (1 - (z / head.softcap) ** 2) * factor


def _chunk_pass(hidden, weight, bias, targets, head: Head, dtype, want_grad: bool):
    """Log-probabilities of a chunk's targets, and (``want_grad``) their gradient w.r.t. the chunk's projection."""
    z, dz = _logits(hidden, weight, bias, head, dtype)
    lse = z.logsumexp(-1, keepdim=True)
    logps = z.gather(1, targets[:, None]).squeeze(1) - lse.squeeze(1)
    if not want_grad:
        return logps, None
    g = z.sub_(lse).exp_().neg_()  # -softmax, in place of the logits
    g.scatter_add_(1, targets[:, None], g.new_ones(targets.shape[0], 1))
    if dz is not None:
        g = g.mul_(dz)
    return logps, g


@functools.cache
def _function():
    """The torch.autograd.Function (defined on first use: this module is imported without torch by the planner)."""
    import torch

    class TrainedLogps(torch.autograd.Function):
        """(hidden [N, H], weight [V, H], bias, targets [N], head, chunk, dtype) -> log p(target) [N], fp32."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, head, chunk, dtype):
            need_weight = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
            keep_jacobian = ctx.needs_input_grad[0] and not need_weight
            logps = torch.empty(hidden.shape[0], dtype=_upcast(hidden[:0].to(dtype)).dtype, device=hidden.device)
            jacobian = torch.empty_like(hidden, dtype=dtype) if keep_jacobian else None
            for s in range(0, hidden.shape[0], chunk):
                lp, g = _chunk_pass(hidden[s:s + chunk], weight, bias, targets[s:s + chunk], head, dtype,
                                    keep_jacobian)
                logps[s:s + chunk] = lp
                if keep_jacobian:  # d log p / d hidden, so that backward needs no second projection
                    jacobian[s:s + chunk] = g.to(dtype) @ weight.to(dtype)
            ctx.head, ctx.chunk, ctx.dtype, ctx.need_weight = head, chunk, dtype, need_weight
            ctx.keep_jacobian, ctx.hidden_dtype = keep_jacobian, hidden.dtype
            if keep_jacobian:
                ctx.save_for_backward(jacobian)
            else:
                ctx.save_for_backward(hidden, weight, bias, targets)
            return logps

        @staticmethod
        def backward(ctx, grad):
            if ctx.keep_jacobian:
                (jacobian,) = ctx.saved_tensors
                return (grad[:, None] * jacobian).to(ctx.hidden_dtype), None, None, None, None, None, None
            return _recomputed_backward(ctx, grad)

    return TrainedLogps


def _recomputed_backward(ctx, grad):
    """Gradients w.r.t. hidden states, weight and bias, the logits recomputed a chunk at a time."""
    import torch

    hidden, weight, bias, targets = ctx.saved_tensors
    dtype, chunk = ctx.dtype, ctx.chunk
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    acc = torch.promote_types(weight.dtype, torch.float32)  # gradients summed over chunks in fp32 (or float64)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (
        bias is not None and ctx.needs_input_grad[2]) else None
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk]
        _, g = _chunk_pass(h, weight, bias, targets[s:s + chunk], ctx.head, dtype, True)
        g = g.mul_(grad[s:s + chunk, None])
        if grad_hidden is not None:
            grad_hidden[s:s + chunk] = (g.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight += g.t().to(dtype) @ h.to(dtype)
        if grad_bias is not None:
            grad_bias += g.sum(0)
    grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


# --------------------------------------------------------------------------------------------------- Liger
def _liger_applies(targets) -> bool:
    return targets.device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def _liger_nll_sum(hidden, targets, head: Head):
    """Liger's fused linear cross-entropy over the trained positions (sum); its softcap is Gemma's, a scale of the
    logits is a scale of the hidden states."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    sel, sel_targets, empty = _selected(hidden, targets)
    if empty:
        return _chunked_logps(hidden, targets, head).sum()
    dtype = _compute_dtype(head.linear.weight)
    sel = sel.to(dtype)
    if head.divide is not None:
        sel = sel / head.divide
    if head.multiply is not None:
        sel = sel * head.multiply
    bias = head.linear.bias
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=head.softcap)
    return loss(head.linear.weight.to(dtype), sel, sel_targets, None if bias is None else bias.to(dtype)).float()
