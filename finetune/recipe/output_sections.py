"""The recipe's eval, tune, export and serve sections."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finetune.recipe.data_sections import Section
from finetune.recipe.train_sections import *  # noqa: F403
from finetune.verdict import VERDICT_RULES

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
