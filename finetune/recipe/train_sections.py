"""The recipe's train section: method, objective, LoRA, preference and GRPO settings, the loop."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from finetune.recipe.data_sections import Section


# ----------------------------------------------------------------------------------------------- train
class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    experts: bool = Field(False, description="Mixture of experts (gpt-oss, Mixtral, Qwen3-MoE): also adapt the "
                          "experts' fused weight tensors (peft target_parameters), which all-linear does not reach. "
                          "Needs export.adapter_gguf: false (llama.cpp writes no adapter for them).")


class PreferenceConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO/KTO: strength of the pull towards the reference model (higher "
                        "stays closer); ORPO: weight of the odds-ratio term against the NLL; SimPO: scale of the "
                        "reward (beta x the reply's mean log-probability per token).")
    gamma: float = Field(0.5, ge=0, description="SimPO: the margin by which the chosen reply's reward must beat the "
                         "rejected one's (TRL's simpo_gamma).")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable rows' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable rows' losses. With unequal "
                                      "counts, keep desirable_weight * n_desirable / (undesirable_weight * "
                                      "n_undesirable) between 1 and 1.33 (KTO paper, Eq. 8).")


RewardName = Literal["exact_match", "numeric_match", "regex", "json_schema", "tool_call_match", "length"]


class RewardConfig(Section):
    name: RewardName | None = Field(None, description="A built-in reward (docs/grpo.md): exact_match, numeric_match "
                                    "(the last number vs the reference's), regex (pattern), json_schema, "
                                    "tool_call_match (vs the reference's calls), length (penalty past max_tokens).")
    function: str | None = Field(None, description="Your reward instead of a built-in: 'module:function' (a module "
                                 "importable from the recipe's folder) with TRL's signature f(prompts, completions, "
                                 "**columns) -> list[float | None].")
    weight: float = Field(1.0, description="Weight of this reward in the sum the advantages are computed from.")
    pattern: str | None = Field(None, description="regex: the completion (stripped) must match it whole (re.fullmatch).")
    json_schema: dict[str, Any] | str | None = Field(None, description="json_schema: a JSON Schema (inline mapping or "
                                                     "a .json path); unset: any valid JSON scores 1.")
    tolerance: float = Field(1e-6, ge=0, description="numeric_match: largest absolute difference that still matches.")
    max_tokens: int | None = Field(None, ge=1, description="length: tokens allowed before the penalty (-(n - "
                                   "max_tokens) / max_tokens, 0 below).")
    conversational: bool = Field(False, description="function: completions as TRL's conversational form "
                                 "([{'role': 'assistant', 'content': ...}]) instead of plain text.")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardConfig:
        if (self.name is None) == (self.function is None):
            raise ValueError("give either name (a built-in reward) or function ('module:function'), not both or neither")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function: write 'module:function', got {self.function!r}")
        for owner, key in (("regex", "pattern"), ("json_schema", "json_schema"), ("length", "max_tokens")):
            if getattr(self, key) is not None and self.name != owner:
                raise ValueError(f"{key} is a setting of the {owner} reward, not of {self.name or self.function}")
        if self.name == "regex" and self.pattern is None:
            raise ValueError("the regex reward needs pattern: (a regular expression the completion must match)")
        if self.name == "length" and self.max_tokens is None:
            raise ValueError("the length reward needs max_tokens: (tokens allowed before the penalty)")
        return self


class GrpoConfig(Section):
    generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group advantages compare).")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion; generation also stops at end of turn.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (and of the loss's "
                               "log-probabilities, as TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    epsilon: float = Field(0.2, ge=0, description="Clip range below 1 of the probability ratio.")
    epsilon_high: float | None = Field(None, ge=0, description="Clip range above 1 (default: epsilon; DAPO: 0.28).")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (the base: adapter off); 0 skips "
                        "the reference pass.")
    iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of rollouts (TRL num_iterations).")
    loss: Literal["grpo", "dr_grpo", "bnpo", "dapo"] = Field(
        "dapo", description="Loss normalisation (TRL loss_type): grpo: mean per completion, then over completions; "
        "dr_grpo: sum / (completions x max_new_tokens); bnpo: token mean per micro-batch; dapo: token mean over the "
        "step.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantages divided by the reward std of the group, of the batch, or not (Dr. GRPO).")
    eval_examples: int = Field(32, ge=1, description="Validation prompts scored (greedy) for the held-out reward.")


class TrainConfig(Section):
    method: Literal["lora", "qlora", "dora", "full"] = Field("lora", description="qlora needs a CUDA GPU (bitsandbytes 4-bit).")
    objective: Literal["sft", "dpo", "kto", "orpo", "simpo", "grpo"] = Field(
        "sft", description="sft: next-token loss on the trained tokens; dpo / orpo / simpo: prompt/chosen/rejected "
        "pairs; "
        "kto: prompt/completion/label rows (or pairs, split into a desirable and an undesirable row). DPO and KTO "
        "compare with a reference: the base with the adapter off (adapters), or the base's log-probabilities "
        "computed once before training (full). grpo: samples completions of each prompt and learns from "
        "train.rewards (docs/grpo.md).")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    rewards: list[RewardConfig] = Field(default_factory=list, description="grpo: the rewards each completion is "
                                        "scored by, summed with their weights.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(2.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_minutes: float | None = Field(None, gt=0, description="Stop (and save) after this much wall-clock time.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per device. Reduce if you run out of memory.")
    batch_tokens: int | None = Field(None, ge=64, description="With packing: tokens per micro-batch (default batch_size * mean length).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw", "adamw_8bit", "sgd", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    packing: bool = Field(True, description="Padding-free batches (no cross-contamination between samples).")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description="auto: on only when memory needs it.")
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger: Liger's fused RMSNorm/SwiGLU Triton kernels (CUDA, pip install liger-kernel). "
        "Off by default: slower for LoRA in our H200 measurements (docs/benchmarks.md).")
    eval_every: int = Field(50, ge=1, description="Validation loss every N optimizer steps.")
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the last K checkpoints.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without improvement.")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: number of cores).")
    log_every: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _grpo_has_rewards(self) -> TrainConfig:
        if self.objective == "grpo" and not self.rewards:
            raise ValueError("train.objective grpo needs train.rewards, e.g. [{name: exact_match}]")
        return self
