"""Sharded training (FSDP2) through accelerate: the one door between ``finetune train`` and the launcher's FSDP config.

The sharding is PyTorch's ``fully_shard`` as accelerate applies it (``Accelerator.prepare`` -> ``fsdp2_prepare_model``:
one FSDP group per decoder layer, the embeddings and head, the root); nothing here shards anything itself. What is
ours:

- the decoder layer class to wrap, found from the model (``layer_classes``), so every family (mixture-of-experts
  included) is wrapped per layer without a class name in the accelerate config;
- the settings that cannot work together, refused before anything is read or written (``check``);
- the weights and optimizer state gathered whole when a checkpoint or the finished adapter/model is written, and
  put back shard by shard when a run resumes: checkpoints stay the files they are under DDP (trainable weights as
  safetensors, the optimizer state by parameter name), independent of the number of processes, and the finished
  adapter is an ordinary peft adapter (the full model an ordinary Hugging Face checkpoint).

On a CPU accelerate does not take its FSDP branch: ``Accelerator(cpu=True)`` under a launcher is MULTI_CPU and the
FSDP plugin is never built (accelerate/state.py only turns MULTI_GPU-like types into FSDP). ``enable_on_cpu`` builds
the plugin from the launcher's environment, as accelerate would, and marks the shared state FSDP, so ``prepare``,
``no_sync``, ``clip_grad_norm_`` run accelerate's own FSDP2 code over gloo: the CPU tests exercise the same path a
GPU run takes.
"""

from __future__ import annotations

import os
from typing import Any

from finetune.errors import UserError

CONFIG = "recipes/accelerate/fsdp2.yaml"
MULTI_NODE_CONFIG = "recipes/accelerate/fsdp2-multi-node.yaml"


def requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP`` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def refuse_unsupported(accelerator) -> None:
    """DeepSpeed, Megatron-LM and FSDP version 1 are refused with the config that works."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM) or (
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
        name = "DEEPSPEED" if kind != DistributedType.MEGATRON_LM else kind.value
        raise UserError(f"accelerate config: distributed_type {name} is not supported by `finetune train`; for a "
                        f"model that does not fit one GPU use FSDP2: accelerate launch --config_file {CONFIG} "
                        "--num_processes N -m finetune train RECIPE (`finetune plan RECIPE --gpus N` says what fits).")
    version = _fsdp_version(accelerator)
    if version is not None and version != 2:
        raise UserError(f"accelerate config: fsdp_version {version} is not supported by `finetune train`; set "
                        f"fsdp_config.fsdp_version: 2 (FSDP2, as in {CONFIG}).")


def _fsdp_version(accelerator) -> int | None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return int(accelerator.state.fsdp_plugin.fsdp_version)
    if requested():
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def enable_on_cpu(accelerator) -> None:
    """Under a launcher that asked for FSDP2, on the CPU: make accelerate's state FSDP with the launcher's plugin
    (see the module's docstring for why accelerate does not do it itself)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the environment the launcher set
    # Both shared states: every later AcceleratorState() (accelerate makes one per prepared optimizer) copies the
    # PartialState's distributed type over its own.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP


def active(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def offloads(accelerator) -> bool:
    """Whether the FSDP2 config keeps parameters (and so the optimizer step) on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    return active(accelerator) and isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)


def check(recipe, accelerator, device_type: str) -> None:
    """Settings that cannot work under this FSDP2 config: one line naming the setting and the fix. (QLoRA without
    CUDA is refused before, by refusals.check_settings, as without FSDP.)"""
    if not active(accelerator):
        return
    t, plugin = recipe.train, accelerator.state.fsdp_plugin
    if t.gradient_checkpointing == "on":
        raise UserError("train.gradient_checkpointing: on is not used under FSDP2, where activation checkpointing is "
                        "the launcher's: set fsdp_config.fsdp_activation_checkpointing: true in the accelerate config "
                        f"({CONFIG}) and train.gradient_checkpointing=auto.")
    if offloads(accelerator) and device_type != "cuda":
        raise UserError("accelerate config: fsdp_offload_params: true moves parameters to the CPU, but this run "
                        f"already trains on the CPU; set fsdp_config.fsdp_offload_params: false ({CONFIG}).")
    if offloads(accelerator) and t.optimizer == "adamw_8bit":
        raise UserError("train.optimizer: adamw_8bit cannot step parameters that fsdp_offload_params: true keeps on "
                        "the CPU (bitsandbytes' 8-bit states are CUDA-only); use train.optimizer=adamw, or set "
                        "fsdp_config.fsdp_offload_params: false.")
    if plugin.cpu_ram_efficient_loading and t.method == "qlora":
        raise UserError("accelerate config: fsdp_cpu_ram_efficient_loading: true cannot load 4-bit (QLoRA) weights "
                        f"(accelerate skips it for them); set fsdp_config.fsdp_cpu_ram_efficient_loading: false "
                        f"({CONFIG}).")
    if t.kernels == "liger":
        raise UserError("train.kernels: liger is not supported under FSDP2 (its fused kernels are applied to the "
                        "unsharded modules); use train.kernels=none.")


# ------------------------------------------------------------------------------------------------ wrapping
def layer_classes(model) -> list[str]:
    """The decoder layer class names to give each its own FSDP group: those of the model's ``_no_split_modules``
    that occur in it (a family's list can name classes of parts not loaded, e.g. a vision tower), else the class
    of the blocks in its largest ModuleList (``model.layers``, ``transformer.h``, ...)."""
    import torch

    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in (getattr(model, "_no_split_modules", None) or []) if n in present]
    if names:
        return sorted(set(names))
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"FSDP2: {type(model).__name__} has no repeated layers to shard one by one; train it "
                        "data-parallel (recipes/accelerate/multi-gpu.yaml).")
    biggest = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return sorted({type(m).__name__ for m in biggest})


def prepare_wrapping(accelerator, model) -> list[str]:
    """Tell accelerate's plugin to wrap by the model's decoder layer class (unless the config names classes)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is None:  # NO_WRAP: one group for the whole model would all-gather everything
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
    if plugin.transformer_cls_names_to_wrap:
        return list(plugin.transformer_cls_names_to_wrap)
    plugin.transformer_cls_names_to_wrap = layer_classes(model)
    return plugin.transformer_cls_names_to_wrap


# ------------------------------------------------------------------------------ whole weights, from shards
def canonical(name: str) -> str:
    """A parameter's name as the unwrapped model has it (activation checkpointing and compile add a level)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full_tensor(p):
    """The whole tensor of a parameter (a collective when it is sharded: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def copy_into(param, value) -> None:
    """Copy a whole tensor into a parameter, sharded or not (this process keeps its shard; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(value.to(param.device_mesh.device_type, param.dtype), param.device_mesh,
                                  param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(value.to(param.device, param.dtype))


def full_model_state(model) -> dict[str, Any]:
    """Every weight gathered whole, on the CPU of the main process (empty on the others), keyed as the unwrapped
    model's state dict: for saving a fully fine-tuned model. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (lm_head = embed_tokens) is one parameter under two names; gathered, the two are separate copies
    # that save_pretrained no longer recognises as one: keep only the first name, as an unsharded save does.
    every = {canonical(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    first = {canonical(n) for n, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in every - first}


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer state gathered whole by parameter name (main process; empty on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    """Put a whole optimizer state (from ``optimizer_state``) back, each process taking its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
