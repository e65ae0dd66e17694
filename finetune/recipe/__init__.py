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

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from finetune import templates
from finetune.recipe import yaml_io
from finetune.recipe.data_sections import (
    CleanConfig,
    DataConfig,
    MixConfig,
    ModelConfig,
    Section,
    SourceConfig,
    SplitConfig,
)
from finetune.recipe.errors import OVERRIDE_PREFIX, RecipeError, problems
from finetune.recipe.output_sections import NEEDS_IMATRIX, EvalConfig, ExportConfig, ParamSpace, ServeConfig, TuneConfig
from finetune.recipe.train_sections import GrpoConfig, LoraConfig, PreferenceConfig, RewardConfig, TrainConfig
from finetune.recipe.yaml_io import (
    flat_keys,
    get_key,
    parse_override,
    read_document,
    read_yaml,
    recipe_files,
    set_key,
)

# Besides the schema and load/validate_dict/dump/with_overrides, other modules take RecipeError and the dotted-key
# helpers from here (their homes: recipe.errors, recipe.yaml_io); the sections come from
# data_sections, train_sections and output_sections.
__all__ = ["OVERRIDE_PREFIX", "Recipe", "RecipeError", "apply_overrides", "dump", "flat_keys", "get_key", "load",
           "parse_override", "read_yaml", "recipe_files", "set_key", "validate_dict", "with_overrides",
           "CleanConfig", "DataConfig", "EvalConfig", "ExportConfig", "GrpoConfig", "LoraConfig", "MixConfig", "ModelConfig", "NEEDS_IMATRIX", "ParamSpace", "PreferenceConfig", "RewardConfig", "Section", "ServeConfig", "SourceConfig", "SplitConfig", "TrainConfig", "TuneConfig"]


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
    return yaml_io.apply_overrides(data, overrides, Recipe)


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
