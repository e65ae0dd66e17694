"""The recipe's model and data sections (and ``Section``, the strict base of every section)."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finetune.models import EMBEDDED_MODEL
from finetune.templates import NAMES as TEMPLATE_NAMES


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
DataFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt", "text", "preference",
                     "kto"]


class SourceConfig(Section):
    path: str | None = Field(None, description="Local file (.jsonl .json .csv .tsv .parquet .txt), relative to the recipe.")
    hub: str | None = Field(None, description="Hugging Face Hub dataset id, e.g. 'yahma/alpaca-cleaned'.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Which split of the source to read.")
    revision: str | None = Field(None, description="Hub dataset revision to pin.")
    streaming: bool = Field(False, description="Stream a large Hub dataset instead of downloading it whole.")
    format: DataFormat = Field("auto", description="Row format; auto detects it from the columns. prompt: TRL's "
                               "prompt-only rows (a prompt, no reply), for train.objective grpo only.")
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
