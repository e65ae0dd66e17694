"""The model a run trains, set up once: packing or padding, the base model in its training dtype and attention,
Liger's fused kernels, the PEFT adapter (LoRA, rsLoRA, DoRA, QLoRA) or full fine-tuning, gradient checkpointing
and the optimizer. The maths is transformers', peft's, bitsandbytes' and torch's; here are the choices.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

ADAPTER_METHODS = ("lora", "dora", "qlora")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def packing(model_dir: Path, wanted: bool, *, trust_remote_code: bool, main: bool) -> tuple[bool, str | None]:
    """Whether batches are packed: ``wanted`` (train.packing), unless the architecture in ``model_dir`` cannot keep
    packed examples apart (then padded batches, said once). Returns (packing, why it is off)."""
    if not wanted:
        return False, None
    from transformers import AutoConfig

    from finetune.training import attention

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    why = attention.packing_obstacle(config)
    if why is None:
        return True, None
    if main:
        print(f"train: packing off for this model: {why}; training on padded batches (same results, more padding)")
    return False, why


@dataclass
class Model:
    """The model to train and how it computes."""

    model: Any
    attn: str                  # the attention implementation it runs
    autocast_dtype: Any        # a torch dtype the maths runs in under autocast, or None
    kernels: str | None        # fused kernels applied: "liger" or None


def build(recipe, resolved, device_type: str, local_index: int, *, packing: bool, sharded: bool = False,
          new_tokens: list[int] | None = None) -> Model:
    """Load the base model in the training dtype and wrap it for the method (train.method); ``sharded``: for FSDP2
    (QLoRA's 4-bit weights are then stored in the compute dtype, which FSDP can shard). ``new_tokens``: ids of turn
    tokens a built-in chat template added (``new_token_ids``): the embeddings grow to hold them and an adapter trains
    just their rows."""
    import torch

    t = recipe.train
    from finetune import hardware

    dtype, compute = hardware.training_dtypes(recipe.model.dtype, t.method, device_type)
    autocast_dtype = getattr(torch, compute) if compute else None
    attn = _attention(recipe.model.attn_implementation, device_type, packing)
    model = _load_base(recipe, resolved, dtype, attn, device=f"cuda:{local_index}" if device_type == "cuda" else "cpu",
                       sharded=sharded)
    attn = getattr(model.config, "_attn_implementation", attn)
    if new_tokens:
        grow_embeddings(model, max(new_tokens) + 1)
    # With use_cache=True transformers builds a cache even in training and then skips the packed mask: the examples
    # of a packed row would attend to each other silently.
    model.config.use_cache = False
    kernels = None
    if t.kernels == "liger":
        if device_type != "cuda" or not installed("liger_kernel"):
            raise UserError("train.kernels: liger needs a CUDA GPU and `pip install liger-kernel`; "
                            "use train.kernels=none.")
        kernels = apply_liger(model)
    if t.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Model(model, attn, autocast_dtype, kernels)
    model = _add_adapter(model, t, new_tokens)
    base_dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
    if device_type == "cpu" and t.method in ("lora", "dora") and base_dtype in (torch.bfloat16, torch.float16):
        # Mixed precision, as a GPU run with bf16=True does: the adapter maths runs in the base dtype under
        # autocast while adapter weights, gradients and optimizer state stay fp32. peft would otherwise cast every
        # activation to fp32 and back around each adapter (scripts/bench_train.py: ~20% faster on 2 CPU cores, same
        # loss curve). tests/unit/test_train.py checks peft still honours cast_input_dtype_enabled.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
        autocast_dtype = base_dtype
    return Model(model, attn, autocast_dtype, kernels)


def _attention(requested: str, device_type: str, packing: bool) -> str:
    if requested != "auto":
        return requested
    if not packing:
        return "auto"  # transformers' own default for the architecture (sdpa, or eager where it has none)
    if device_type == "cuda" and installed("flash_attn"):
        return "flash_attention_2"
    from finetune.training import attention

    return attention.register()  # per-example causal SDPA over packed rows


def _load_base(recipe, resolved, dtype: str, attn: str, *, device: str, sharded: bool = False):
    from finetune import models

    quant = models.four_bit_config(dtype) if recipe.train.method == "qlora" else None
    if quant is not None and sharded:
        # FSDP2 shards floating-point tensors only: bitsandbytes packs the 4-bit weights into uint8 by default, which
        # accelerate then leaves unsharded on every GPU. Packed into the compute dtype (bf16) they shard like any
        # weight (Answer.AI's FSDP+QLoRA, axolotl); the quantized values are the same, and so is the saved adapter.
        quant.bnb_4bit_quant_storage = quant.bnb_4bit_compute_dtype
    return models.load_model(resolved, dtype, device=device, trust_remote_code=recipe.model.trust_remote_code,
                             attn_implementation=attn, quantization_config=quant)


def new_token_ids(recipe, resolved, tokenizer) -> list[int]:
    """Ids of the turn tokens a built-in model.chat_template added to ``tokenizer`` (``finetune.templates``): tokens
    the base model's own tokenizer lacks. Empty for the model's own template or a .jinja file."""
    from finetune import models, templates

    if templates.builtin_of(recipe.chat_template_path()) is None:
        return []
    base = models.load_tokenizer(resolved.path, trust_remote_code=recipe.model.trust_remote_code, pad_with_eos=False)
    return templates.new_token_ids(tokenizer, base)


def grow_embeddings(model, rows: int) -> None:
    """Give the model at least ``rows`` embedding rows (tokens a chat template added). transformers initialises new
    rows from the mean and covariance of the old ones, so a new token starts as an ordinary one."""
    if model.get_input_embeddings().weight.shape[0] < rows:
        model.resize_token_embeddings(rows)


def _trainable_tokens(model, ids: list[int] | None) -> dict[str, list[int]] | None:
    """peft's trainable tokens for the new token ids: their rows of the input embedding, and of an untied output
    head too (a tied one follows the embedding), so the model learns to read and to write them."""
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    out = {names[id(model.get_input_embeddings())]: list(ids)}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out[names[id(head)]] = list(ids)
    return out


def _add_adapter(model, t, new_tokens: list[int] | None = None):
    """The PEFT wrapper for train.method lora/dora/qlora with the train.lora settings ``t.lora``; the rows of
    ``new_tokens`` trained as peft's trainable tokens (not the whole embedding)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if t.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing == "on",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = t.lora
    experts = expert_parameters(model) if lora.experts else None
    if lora.experts and not experts:
        raise UserError("train.lora.experts: this model has no expert weight tensors (it is not a mixture of experts, "
                        "or its experts are linear layers, which all-linear already adapts); set train.lora.experts: "
                        "false")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        target_parameters=experts, use_rslora=lora.rslora, use_dora=t.method == "dora",
                        trainable_token_indices=_trainable_tokens(model, new_tokens), task_type="CAUSAL_LM")
    try:
        # peft keeps adapter weights in fp32 over a bf16/fp16 base (autocast_adapter_dtype): stable updates
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"train.lora.target_modules: {exc}. Use 'all-linear' or names of the model's linear "
                        "layers (e.g. [q_proj, v_proj]).") from None


def in_experts(name: str) -> bool:
    """Whether a parameter or module, by its dotted name, lies inside a mixture-of-experts layer's experts."""
    return ".experts." in f".{name}."


def expert_parameters(model) -> list[str]:
    """The experts' fused weight tensors of a mixture-of-experts model, named as peft's target_parameters takes
    them (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``: one name per tensor of a decoder layer; biases
    left out)."""
    names = set()
    for name, param in model.named_parameters():
        if param.ndim == 3 and in_experts(name) and ".layers." in name:
            names.add(name.split(".layers.", 1)[1].split(".", 1)[1])  # drop the layer number
    return sorted(names)


def apply_liger(model) -> str:
    """Liger's fused RMSNorm/SwiGLU Triton kernels on this model instance only; returns "liger".

    Liger's apply functions also replace classes and functions in the transformers modeling module (every model
    built later in the process, on any device, would get them: a CPU model then fails inside Triton). Those
    module attributes are put back right after; the instance keeps its patched modules. Liger's RoPE is such a
    module-level function, so it is not used. tests/unit/test_train_cuda.py checks the module is left as it was.
    """
    import importlib

    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise UserError(f"train.kernels: liger could not be imported ({exc}).") from None
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"train.kernels: Liger has no kernels for model type {model.config.model_type!r}; "
                        "use train.kernels=none.")
    module = importlib.import_module(type(model).__module__)
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=False)
    except Exception as exc:
        raise UserError(f"train.kernels: Liger failed on this model ({type(exc).__name__}: {exc}); "
                        "use train.kernels=none.") from None
    finally:
        for name in set(vars(module)) - set(before):
            delattr(module, name)
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return "liger"


# -------------------------------------------------------------------------------- gradient checkpointing
def wants_gradient_checkpointing(recipe, model, device_type: str) -> bool:
    """on/off as asked; auto: off on a CPU (system memory, ~25% slower otherwise), on a GPU only when the
    memory plan says training does not fit without it (an out-of-memory error later also switches it on)."""
    mode = recipe.train.gradient_checkpointing
    if mode != "auto":
        return mode == "on"
    if device_type != "cuda":
        return False
    try:
        import torch

        from finetune.training import memory

        free, _ = torch.cuda.mem_get_info()
        dims = memory.ModelDims.from_config(model.config.to_dict())
        settings = memory.settings_for(recipe, "cuda", gradient_checkpointing=False)
        return not memory.fits(memory.estimate(dims, settings), int(free * 0.9))
    except Exception as exc:  # the planner is advice; training still has the out-of-memory fallback
        print(f"train: memory plan unavailable ({type(exc).__name__}: {exc}); gradient checkpointing off",
              file=sys.stderr)
        return False


def enable_gradient_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def oom_message(recipe, gc_on: bool) -> str:
    """What to turn when a step runs out of GPU memory, with this recipe's numbers."""
    t = recipe.train
    gc = "on" if gc_on else "off"
    hints = [f"train.batch_size={max(1, t.batch_size // 2)} train.grad_accum={t.grad_accum * 2} "
             f"(now {t.batch_size} x {t.grad_accum}: same effective batch, half the memory)",
             f"data.clean.max_tokens={max(64, recipe.data.clean.max_tokens // 2)} (now {recipe.data.clean.max_tokens}; "
             "then rerun prepare)"]
    if gc == "off":
        hints.append("train.gradient_checkpointing=on (about 25% slower, much less activation memory)")
    if t.method != "qlora":
        hints.append("train.method=qlora (4-bit base weights)")
    if t.batch_tokens:
        hints.insert(0, f"train.batch_tokens={t.batch_tokens // 2} (now {t.batch_tokens})")
    return ("CUDA out of memory during training (gradient checkpointing " + gc + "). Turn one of these knobs, e.g. "
            "`finetune train RECIPE <key>=<value>`:\n  - " + "\n  - ".join(hints)
            + "\n`finetune plan RECIPE` estimates the memory each setting needs.")


# ------------------------------------------------------------------------------------------------ optimizer
def optimizer(name: str, model, lr: float, weight_decay: float, device_type: str):
    """train.optimizer over the trainable parameters; no weight decay on biases and norms (1-d parameters)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ({"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=device_type == "cuda")
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
