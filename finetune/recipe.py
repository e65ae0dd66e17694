"""The recipe: one YAML file, one strict schema, a small typed section per stage.

Loading is pure: it reads and validates, nothing else. Unknown keys and wrong types are errors that
name the key, its line, what was received and the closest valid key (or our name for a key another tool
uses, ``learning_rate`` -> ``train.lr``); every error in the file is reported at once (``RecipeError``).
Types are strict: a boolean or a quoted string is never taken as a number. Dotted overrides
(``train.lr=1e-4``, ``data.sources.0.path=other.jsonl``) go through the same validation, and a problem
they cause names the override, not the file. Relative paths in a recipe are resolved against the recipe
file's folder.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune import recipe_yaml, templates
from finetune.models import EMBEDDED_MODEL
from finetune.recipe_errors import OVERRIDE_PREFIX, RecipeError, problems
from finetune.recipe_yaml import (
    flat_keys,
    get_key,
    parse_override,
    read_document,
    read_yaml,
    recipe_files,
    set_key,
)
from finetune.templates import NAMES as TEMPLATE_NAMES
from finetune.verdict import VERDICT_RULES

# Besides the schema and load/validate_dict/dump/with_overrides, other modules take RecipeError and the dotted-key
# helpers from here (their homes: recipe_errors, recipe_yaml).
__all__ = ["OVERRIDE_PREFIX", "Recipe", "RecipeError", "apply_overrides", "dump", "flat_keys", "get_key", "load",
           "parse_override", "read_yaml", "recipe_files", "set_key", "validate_dict", "with_overrides"]


class Section(BaseModel):
    # strict: no silent coercion. `epochs: yes` (a boolean) and `batch_size: "8"` (text) are errors, not 1 and 8.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# ----------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    id: str = Field(
        EMBEDDED_MODEL,
        description="Hub id (org/name), a local model directory, a .gguf file, or the embedded default "
        f"'{EMBEDDED_MODEL}' (works offline).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model. Off by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype for training/inference. auto: bf16 where supported, else fp32."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gated: bool = Field(False, description="The Hub model is license-gated: accept its license and `hf auth login`.")
    chat_template: str | None = Field(
        None, description="A chat template used instead of the model's own in prepare, train, eval, export (it goes "
        f"into the GGUF) and serve: a built-in name ({', '.join(TEMPLATE_NAMES)}; the family's own template, for a "
        "base model without one: turn tokens its tokenizer lacks are added as special tokens and their embedding "
        "rows trained) or a .jinja file (relative to the recipe; it must use the model's own turn tokens), e.g. a "
        "tool-calling template for a model whose own template has no tool section.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_name_or_file(cls, value: str | None) -> str | None:
        if value is None or value in TEMPLATE_NAMES or value.endswith(".jinja"):
            return value
        close = difflib.get_close_matches(value, TEMPLATE_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{value!r} is neither a built-in template{hint} ({', '.join(TEMPLATE_NAMES)}) nor a "
                         ".jinja file")


# ------------------------------------------------------------------------------------------------ data
DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto"]


class SourceConfig(Section):
    path: str | None = Field(None, description="Local file (.jsonl .json .csv .tsv .parquet .txt), relative to the recipe.")
    hub: str | None = Field(None, description="Hugging Face Hub dataset id, e.g. 'yahma/alpaca-cleaned'.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Which split of the source to read.")
    revision: str | None = Field(None, description="Hub dataset revision to pin.")
    streaming: bool = Field(False, description="Stream a large Hub dataset instead of downloading it whole.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the columns.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map your column names to the format's fields, e.g. {prompt: question, completion: answer}.",
    )
    max_rows: int | None = Field(None, ge=1, description="Take at most this many rows from the source.")
    weight: float = Field(
        1.0, gt=0, description="Repeat (2.0 = twice) or subsample (0.5 = about half) this source's training rows "
        "when mixing sources; validation/test rows are never reweighted.",
    )
    role: Literal["all", "train", "validation", "test"] = Field(
        "all", description="'all': split by ratios; otherwise this source is that split as it is."
    )

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if self.path is not None and self.hub is not None:
            raise ValueError(f"a source needs exactly one of 'path' (local file) or 'hub' (Hub dataset id), got both "
                             f"({self.path!r} and {self.hub!r}); remove one (on the command line: hub=null or "
                             "path=null on that source, e.g. data.sources.0.hub=null)")
        if self.path is None and self.hub is None:
            raise ValueError("a source needs exactly one of 'path' (local file) or 'hub' (Hub dataset id)")
        if self.path is not None:
            hub_only = [k for k in ("config", "revision") if getattr(self, k) is not None]
            hub_only += ["streaming"] if self.streaming else []
            if hub_only:
                verb = "is" if len(hub_only) == 1 else "are"
                raise ValueError(f"{', '.join(hub_only)} {verb} for Hub sources ('hub:') only, not for a local 'path'")
        return self


class CleanConfig(Section):
    normalize_unicode: bool = Field(True, description="NFKC-normalise text and strip control characters.")
    strip_whitespace: bool = Field(True, description="Trim and collapse runs of spaces; keep newlines.")
    dedupe: bool = Field(True, description="Drop exact duplicates.")
    near_dedupe: bool = Field(True, description="Drop near duplicates (MinHash LSH).")
    near_dedupe_threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity above which rows are near duplicates.")
    min_tokens: int = Field(4, ge=0, description="Drop rendered examples shorter than this.")
    max_tokens: int = Field(1024, ge=8, description="Sequence length limit for rendered examples.")
    overlong: Literal["drop", "truncate"] = Field("drop", description="What to do with examples over max_tokens.")
    require_assistant_last: bool = Field(True, description="Drop conversations that do not end with an assistant turn.")


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1, description="Share of rows for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Share of rows for test.")
    group_by: str | None = Field(None, description="Column whose equal values stay in one split (e.g. conversation id).")
    leakage_check: bool = Field(True, description="Remove train rows that duplicate (or nearly) a validation/test row.")

    @model_validator(mode="after")
    def _ratios(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(f"validation ({self.validation}) + test ({self.test}) must leave rows for training (< 1)")
        return self


class MixConfig(Section):
    general: float = Field(
        0.0, ge=0, le=1, description="Replay against forgetting: add this many general chat rows per training row "
        "to the training split (0.1: one per ten; 0: none). The rows are the base model's own greedy answers to the "
        "general prompts shipped in finetune/general/replay_prompts.jsonl, generated by prepare and cached; "
        "validation and test are untouched. Your own general chat data: a source with role: train and a weight.")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Where the rows come from (at least one).")
    system_prompt: str | None = Field(None, description="System prompt added to conversations that have none.")
    default_input: str = Field("", description="Value for a missing Alpaca 'input' field.")
    train_on: Literal["assistant", "all", "last_assistant", "completion"] = Field(
        "assistant", description="Which tokens get loss: assistant turns (default), all, the last assistant turn, or completion."
    )
    reasoning: Literal["auto", "keep", "drop", "answer_without"] = Field(
        "auto", description="What happens to reasoning (reasoning_content or <think>...</think>) in assistant turns: "
        "auto = what the model's chat template does at inference; keep = render and train it; drop = remove it; "
        "answer_without = remove it and switch the template's thinking off (enable_thinking=false) in training, "
        "eval and serving alike. answer_without needs a template with that switch (Qwen3, Qwen3.5, SmolLM3).",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    mix: MixConfig = Field(default_factory=MixConfig, description="General data blended into training (replay).")


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


# ------------------------------------------------------------------------------------------------- eval
MetricName = Literal["loss", "perplexity", "exact_match", "accuracy", "f1", "precision", "recall", "rouge", "bleu", "chrf",
                     "tool_call_match"]


class EvalConfig(Section):
    metrics: list[MetricName] = Field(
        default_factory=lambda: ["loss", "perplexity", "exact_match", "rouge", "bleu"],
        description="Metrics to compute on the test split. Text metrics compare the answer without its reasoning "
        "block; tool_call_match: the called functions' names and JSON-equal arguments, on rows whose reference calls "
        "tools.",
    )
    hub_metrics: bool = Field(
        False, description="Score with the Hub's evaluate-metric/<name> modules instead of the local ones (needs "
        "the network; the local ones score when the Hub cannot be reached). metrics.json's metric_sources says which "
        "scored.",
    )
    split: Literal["test", "validation"] = "test"
    max_examples: int | None = Field(200, ge=1, description="Score at most this many examples (None: all).")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    gguf: bool = Field(True, description="Also score the exported GGUF (when export has run).")
    gguf_quant: str = Field("Q8_0", description="Which exported quantization to score.")
    forgetting: bool = Field(True, description="Forgetting check: the fine-tuned model against the base on shipped "
                             "general prompts and text (finetune/general/). " + VERDICT_RULES["forgetting"])


# ------------------------------------------------------------------------------------------------- tune
class ParamSpace(Section):
    values: list[Any] | None = Field(None, description="Choices (grid or categorical), e.g. [8, 16, 32].")
    # int | float: with strict types, `low: 10` stays an integer and fits an integer key such as train.max_steps
    low: int | float | None = Field(None, description="Lowest value of a range (integers for integer keys such as train.lora.r).")
    high: int | float | None = Field(None, description="Highest value of a range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates).")

    @model_validator(mode="after")
    def _shape(self) -> ParamSpace:
        if self.values is not None and (self.low is not None or self.high is not None):
            raise ValueError("give either 'values' or 'low'/'high', not both")
        if self.values is None and (self.low is None or self.high is None):
            raise ValueError("give either 'values' or both 'low' and 'high'")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0 (got {self.low})")
        return self


class TuneConfig(Section):
    sampler: Literal["grid", "random", "tpe"] = Field(
        "tpe", description="grid: every combination of 'values'; random; tpe: learns from earlier trials."
    )
    trials: int = Field(8, ge=1, description="Trial budget (a grid stops when every combination has run).")
    timeout_minutes: float | None = Field(None, gt=0, description="Start no new trial after this much time.")
    metric: Literal["validation_loss"] = Field("validation_loss", description="Minimised: best validation loss of a trial.")
    prune: bool = Field(True, description="Stop bad trials early on validation loss.")
    trial_max_steps: int | None = Field(30, ge=1, description="Small per-trial budget so a CPU search finishes.")
    space: dict[str, ParamSpace] = Field(default_factory=dict, description="Dotted recipe key -> search space.")


# ----------------------------------------------------------------------------------------------- export
QuantType = Literal["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q5_0",
                    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS",
                    "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K_S"]
# llama.cpp refuses these without an importance matrix (export.imatrix computes one from the training data).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}


class ExportConfig(Section):
    outtype: Literal["F16", "BF16", "F32"] = Field("F16", description="Type of the first, unquantized GGUF.")
    quantizations: list[str] = Field(
        default_factory=lambda: ["Q8_0", "Q4_K_M"],
        description="llama.cpp types written from the first GGUF: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q5_0, Q4_0.",
    )
    adapter_gguf: bool = Field(True, description="Also write the LoRA adapter as a GGUF adapter.")
    ollama: bool = Field(True, description="Write an Ollama Modelfile next to each GGUF.")
    parity: bool = Field(True, description="Run the parity checks (tokens, chat prompt, logits, greedy chat).")
    min_top1_f16: float = Field(0.99, ge=0, le=1, description="F16 teacher-forced top-1 agreement required.")
    imatrix: bool = Field(True, description="Quantize the types below 8 bits with an importance matrix measured on "
                          "the training split (and imatrix_files); needed for IQ1/IQ2/IQ3_XXS.")
    imatrix_files: list[str] = Field(default_factory=list, description="More calibration text for the importance "
                                     "matrix: .txt (paragraphs) or .jsonl (messages or text), relative to the recipe.")
    imatrix_tokens: int = Field(16384, ge=64, description="Calibration tokens the importance matrix is measured on.")
    table_examples: int = Field(24, ge=0, description="Held-out prompts each GGUF type answers for the exact-match "
                                "column of export/quantization.json (0: none).")
    fit_gb: float | None = Field(None, gt=0, description="Pick the smallest exported type within this many GB whose "
                                 "exact match stays within metric_tolerance of the unquantized GGUF; it becomes the "
                                 "Modelfile's default (and serve's with serve.quant: auto).")
    metric_tolerance: float = Field(0.02, ge=0, le=1, description="How far below the unquantized GGUF's exact match "
                                    "the picked type may be.")

    @model_validator(mode="after")
    def _imatrix_types(self) -> ExportConfig:
        needing = [q for q in self.quantizations if q.upper() in NEEDS_IMATRIX]
        if needing and not self.imatrix:
            raise ValueError(f"quantizations {needing} need an importance matrix: set imatrix: true or drop them")
        return self

    @field_validator("quantizations")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        known = list(QuantType.__args__)
        for q in v:
            if q not in known:
                close = difflib.get_close_matches(q.upper(), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{q!r} is not a type finetune exports{hint}; use one of {known}")
        return v


# ------------------------------------------------------------------------------------------------ serve
class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Bind address. Anything but loopback needs api_key (or FINETUNE_API_KEY).")
    port: int = Field(8765, ge=1, le=65535)
    api_key: str | None = Field(None, description="Bearer key for /v1 and /api. Required when host is not a loopback address.")
    quant: str = Field("Q8_0", description="Which exported GGUF to serve (a key of the export's gguf outputs), or "
                       "auto: the type export picked for export.fit_gb.")
    n_ctx: int = Field(2048, ge=128, description="Context window (prompt + answer) in tokens.")
    max_prompt_tokens: int | None = Field(
        None, ge=16, description="Longer prompts get HTTP 400 (context_length_exceeded). Default: n_ctx minus room for "
        "the answer (max_tokens, at most a quarter of n_ctx)."
    )
    max_tokens: int = Field(512, ge=1, description="Most tokens one answer may have; larger requests are clamped.")
    max_concurrent: int = Field(
        16, ge=1, description="Requests admitted at once (generating or queued for a worker); more get HTTP 429."
    )
    workers: int = Field(1, ge=1, description="Model processes generating in parallel (each holds a copy of the model).")
    queue_timeout_s: float = Field(600, gt=0, description="A queued request waiting longer than this gets HTTP 503.")
    threads: int | None = Field(None, ge=1, description="CPU threads per worker (default: cores / workers).")
    log_conversations: bool = Field(True, description="Store each chat exchange locally (for feedback export).")
    chat_template: str | None = Field(
        None, description="A .jinja chat template to use instead of the GGUF's own (only for GGUFs without one)."
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> ServeConfig:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= self.n_ctx:
            raise ValueError(
                f"max_prompt_tokens ({self.max_prompt_tokens}) must be below n_ctx ({self.n_ctx}) to leave room for the answer"
            )
        return self

    @property
    def prompt_limit(self) -> int:
        """The longest prompt accepted: max_prompt_tokens, or n_ctx minus min(max_tokens, n_ctx / 4)."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        return self.n_ctx - min(self.max_tokens, self.n_ctx // 4)


# ----------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(..., description="Run name: outputs go to runs/<name>/<stage>/.")
    description: str | None = None
    seed: int = 42
    runs_dir: str = Field("runs", description="Where run folders go, relative to the current directory.")
    card_gb: int | None = Field(None, description="The GPU memory this recipe is sized for (checked by `finetune plan`).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    # Set by load(): the folder relative paths are resolved against. Not part of the YAML.
    _base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _expert_lora_has_no_adapter_gguf(self) -> Recipe:
        if self.train.lora.experts and self.export.adapter_gguf and self.train.method in ("lora", "qlora"):
            raise ValueError("train.lora.experts: llama.cpp's LoRA converter writes no adapter for expert tensors; set "
                             "export.adapter_gguf: false (the merged GGUFs carry the fine-tune), or "
                             "train.lora.experts: false")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"use letters, digits, '.', '_' or '-' (it becomes a folder name), got {v!r}")
        return v

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve_path(self, p: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def chat_template_path(self) -> Path | None:
        """model.chat_template as a file: a built-in name's, or a path resolved against the recipe's folder (None: the
        model's own template)."""
        name = self.model.chat_template
        if name is None:
            return None
        return templates.path(name) if templates.is_name(name) else self.resolve_path(name)

    def run_dir(self, stage: str | None = None) -> Path:
        root = Path(self.runs_dir).expanduser() / self.name
        return root / stage if stage else root

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the raw recipe with the overrides applied (not validated)."""
    return recipe_yaml.apply_overrides(data, overrides, Recipe)


def validate_dict(data: Any, source: str = "recipe", base_dir: Path | None = None, *,
                  lines: dict[tuple, int] | None = None, overrides: list[str] = ()) -> Recipe:
    """Validate a raw recipe. `lines` (key path -> line) and `overrides` let a problem name where it came from."""
    if not isinstance(data, dict):
        raise RecipeError(source, [f"the top level must be a mapping of keys (name:, model:, ...), got {type(data).__name__}"])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        applied = [(tuple(text.partition("=")[0].strip().split(".")), text) for text in overrides]
        raise RecipeError(source, problems(exc, Recipe, lines=lines, overrides=applied)) from None
    recipe._base_dir = (base_dir or Path(".")).resolve()
    return recipe


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError listing every problem, each with its origin."""
    path = Path(path)
    data, lines = read_document(path, frozenset(Recipe.model_fields))
    overrides = list(overrides or [])
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_dict(data, source=str(path), base_dir=path.parent, lines=lines, overrides=overrides)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (round-trips through load)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """A copy of the recipe with dotted overrides applied and validated (used by tune)."""
    data = recipe.to_dict()
    texts = []
    for key, value in overrides.items():
        text = f"{key}={value}"
        set_key(data, key, value)
        texts.append(text)
    return validate_dict(data, source="recipe with overrides", base_dir=recipe.base_dir, overrides=texts)
