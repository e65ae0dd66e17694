"""What each stage hands to the next: one typed, frozen record per stage, kept in the ``outputs`` of its manifest.

A stage builds its record and writes it with ``StageRun.record(...)``; a later stage (or ``plan``, ``serve``, the
pipeline's sample answer) reads it with ``load(recipe, Trained, recipe_path)``, which refuses a stage that has not
finished or whose outputs are stale (``finetune.run.freshness``) and returns the record with absolute paths. Paths are
stored relative to the run folder (``runs/<name>/``), so a run folder can be moved; a path outside it (the base model
in the cache) is stored as it is. Nothing else reads a manifest's outputs: a missing key is an error that says which
stage to run again, never a guessed default path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_type_hints

from finetune.errors import UserError
from finetune.run import runs

SPLITS = ("train", "validation", "test")
# The metadata of a field added after manifests without it were written: those read as the field's default.
ADDED_LATER = {"added_later": True}


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """Common to every record: which stage wrote it and which manifest it came from."""

    STAGE: ClassVar[str] = ""
    manifest_id: str = field(default="", compare=False)  # runs.manifest_id of the manifest read (set by load)

    def to_outputs(self, run_folder: Path) -> dict[str, Any]:
        """The record as a manifest's ``outputs`` (``StageRun.record`` writes it): see ``to_outputs``."""
        return to_outputs(self, run_folder)


@dataclass(frozen=True, kw_only=True)
class Prepared(Artifact):
    STAGE: ClassVar[str] = "prepare"
    splits: dict[str, Path]     # split -> rows as JSON lines (what eval scores)
    tokenized: dict[str, Path]  # split -> datasets folder of token arrays
    rows: dict[str, int]
    report: Path
    lengths_png: Path


@dataclass(frozen=True, kw_only=True)
class Trained(Artifact):
    STAGE: ClassVar[str] = "train"
    method: str
    adapter: Path | None = None    # LoRA/DoRA/QLoRA: the adapter folder
    model: Path | None = None      # full fine-tuning: the model folder
    base_model: Path      # the checkpoint the run started from
    log: Path
    summary: Path
    tensorboard: Path

    @property
    def weights(self) -> Path:
        """The folder with what training produced (adapter or full model)."""
        return self.adapter if self.adapter is not None else self.model  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class Exported(Artifact):
    STAGE: ClassVar[str] = "export"
    merged: Path
    gguf: dict[str, Path]       # type (F16, Q8_0, ...) -> file
    adapter_gguf: Path | None = None
    base_gguf: Path | None = None
    parity: Path | None = None
    quantization: Path | None = None
    imatrix: Path | None = None
    picked: str | None = None      # the type export.fit_gb chose (serve.quant: auto)
    quantization_chart: Path | None = field(default=None, metadata=ADDED_LATER)  # None: no measure to plot

    def gguf_to_serve(self, requested: str | None = None) -> str:
        """The type Ollama's ``Modelfile``, ``serve``, ``chat`` and eval's GGUF column use: ``requested`` when
        given (a type, or auto: the picked one), else ``recommended_type``. Raises UserError naming what exists."""
        types = sorted(self.gguf)
        if requested == "auto":
            if not self.picked:
                raise UserError("serve.quant: auto needs export.fit_gb, so that `finetune export` picks a type (none "
                                f"was picked); set export.fit_gb or serve.quant to one of: {', '.join(types) or 'none'}")
            return self.picked
        if requested is not None:
            if requested not in self.gguf:
                raise UserError(f"the export has no {requested} GGUF (it has: {', '.join(types) or 'none'}); ask for "
                                f"one of those, or add {requested} to export.quantizations and export again")
            return requested
        return recommended_type(list(self.gguf), self.picked)


# The type served when nothing was asked for and export picked none (serve.quant's default).
DEFAULT_SERVE_TYPE = "Q8_0"


def recommended_type(types: list[str], picked: str | None) -> str:
    """The one GGUF type every consumer uses unless told otherwise: the type export picked for export.fit_gb,
    else Q8_0 when exported, else the first quantized type, else the unquantized one (``types``: in export order,
    the unquantized first)."""
    if picked in types:
        return picked  # type: ignore[return-value]
    if DEFAULT_SERVE_TYPE in types:
        return DEFAULT_SERVE_TYPE
    if not types:
        raise UserError("the export wrote no GGUF; run `finetune export RECIPE` again")
    return types[1] if len(types) > 1 else types[0]


def served_type(types: list[str], picked: str | None, requested: str | None) -> str:
    """The type export's ``Modelfile`` serves: ``requested`` (serve.quant when the recipe sets it; auto: the picked
    type) when it was exported, else ``recommended_type``."""
    asked = picked if requested == "auto" else requested
    return asked if asked is not None and asked in types else recommended_type(types, picked)


def requested(section: Any, key: str) -> Any:
    """A recipe key's value when the recipe (or an override) set it, None when it is the schema's default: a
    default ``serve.quant: Q8_0`` does not outrank the type export picked, a written one does."""
    return getattr(section, key) if key in section.model_fields_set else None


@dataclass(frozen=True, kw_only=True)
class Evaluated(Artifact):
    STAGE: ClassVar[str] = "eval"
    metrics: Path
    examples: Path
    report: Path
    variants: list[str]


@dataclass(frozen=True, kw_only=True)
class Tuned(Artifact):
    STAGE: ClassVar[str] = "tune"
    results_csv: Path
    results_json: Path
    best_recipe: Path
    study: Path
    best_trial: int
    best_value: float
    best_params: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """The records a stage reads, loaded by ``for_stage`` (the pipeline and each command use the same)."""

    prepared: Prepared | None = None
    trained: Trained | None = None
    exported: Exported | None = None  # eval: None when export has not run (stale allowed when eval.gguf is off)

    def ids(self) -> dict[str, str]:
        """{stage: manifest_id} of what was read: recorded by the reading stage so a rerun upstream makes it stale."""
        return {a.STAGE: a.manifest_id for a in (self.prepared, self.trained, self.exported) if a is not None}


A = TypeVar("A", bound=Artifact)
RECORDS: dict[str, type[Artifact]] = {c.STAGE: c for c in (Prepared, Trained, Exported, Evaluated, Tuned)}


# ------------------------------------------------------------------------------------------ to and from JSON
def to_outputs(record: Artifact, run_folder: Path) -> dict[str, Any]:
    """The record as the manifest's ``outputs``: paths relative to the run folder where they are inside it."""
    root = Path(run_folder).resolve()
    return {f.name: _encode(getattr(record, f.name), root) for f in dataclasses.fields(record)
            if f.name != "manifest_id"}


def from_outputs(cls: type[A], outputs: dict[str, Any], run_folder: Path, *, manifest_id: str = "",
                 where: str = "") -> A:
    """The record from a manifest's ``outputs`` (paths made absolute). A missing key is a UserError naming
    ``where`` (the manifest) and the stage to run again, except a field marked ``ADDED_LATER`` (its default)."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "manifest_id" or (f.name not in outputs and f.metadata.get("added_later")):
            continue
        if f.name not in outputs:
            raise UserError(f"{where}: the {cls.STAGE} outputs lack '{f.name}' (written by an older finetune?); "
                            f"run `finetune {cls.STAGE} RECIPE` again")
        values[f.name] = _decode(outputs[f.name], hints[f.name], Path(run_folder))
    return cls(manifest_id=manifest_id, **values)


def _encode(value: Any, root: Path) -> Any:
    if isinstance(value, Path):
        absolute = value if value.is_absolute() else value.resolve()
        return str(absolute.relative_to(root)) if absolute.is_relative_to(root) else str(value)
    if isinstance(value, dict):
        return {k: _encode(v, root) for k, v in value.items()}
    return value


def _decode(value: Any, hint: Any, root: Path) -> Any:
    if value is None:
        return None
    if hint == dict[str, Path]:
        return {k: root / v for k, v in value.items()}
    if hint in (Path, Path | None):
        return root / value  # an absolute path (outside the run folder, or an older manifest) stays as it is
    return value


# ------------------------------------------------------------------------------------------------ reading
def load(recipe: Any, cls: type[A], recipe_path: str = "RECIPE", *, fresh: bool = True,
         checked: set[str] | None = None) -> A:
    """The finished record of ``cls.STAGE`` for this recipe's run. ``fresh``: its outputs must still match the
    recipe and their inputs (``freshness.require_fresh``: "prepared data is stale because ... run ...");
    ``checked`` holds the stages already found fresh by the same reader, which are not checked again."""
    from finetune.run import freshness

    manifest = (freshness.require_fresh(recipe, cls.STAGE, recipe_path, checked=checked) if fresh
                else runs.require_stage(recipe, cls.STAGE, recipe_path))
    return _record(recipe, cls, manifest)


def load_if_finished(recipe: Any, cls: type[A]) -> A | None:
    """The record when the stage has finished (fresh or not), else None: for readers that can do without it."""
    manifest = runs.read_manifest(recipe.run_dir(cls.STAGE))
    return None if manifest is None else _record(recipe, cls, manifest)


def upstream_of(recipe: Any, cls: type[Artifact], stage: str) -> str | None:
    """The manifest id of ``stage``'s outputs that the finished ``cls.STAGE`` run read (None: not finished, or it
    read none): whether eval scored the export that is there now, for example."""
    manifest = runs.read_manifest(recipe.run_dir(cls.STAGE)) or {}
    return ((manifest.get("inputs") or {}).get("upstream") or {}).get(stage)


def _record(recipe: Any, cls: type[A], manifest: dict[str, Any]) -> A:
    return from_outputs(cls, manifest.get("outputs") or {}, recipe.run_dir(), manifest_id=runs.manifest_id(manifest),
                        where=f"{recipe.run_dir(cls.STAGE)}/manifest.json")


def from_folder(cls: type[A], stage_dir: Path) -> A:
    """The record in a finished stage folder given by path (scripts that take ``runs/<name>/export``)."""
    stage_dir = Path(stage_dir)
    manifest = runs.read_manifest(stage_dir)
    if manifest is None:
        raise UserError(f"{stage_dir}/manifest.json not found: run `finetune {cls.STAGE} RECIPE` first")
    return from_outputs(cls, manifest.get("outputs") or {}, stage_dir.parent, manifest_id=runs.manifest_id(manifest),
                        where=f"{stage_dir}/manifest.json")


def summary(recipe: Any, cls: type[Artifact]) -> dict[str, Any]:
    """The figures a finished stage wrote next to its record (its manifest's ``summary``: export's sizes, parity
    figures, warnings and seconds), {} when there are none. For people; no stage reads them."""
    manifest = runs.read_manifest(recipe.run_dir(cls.STAGE)) or {}
    return manifest.get("summary") or {}


def for_stage(recipe: Any, stage: str, recipe_path: str = "RECIPE") -> Upstream:
    """What ``stage`` reads, as the stage graph (``freshness.STAGES``) says: its upstream stages fresh (an optional
    one only when it has run, fresh while its recipe key is on), its ``also_reads`` when finished. Each upstream
    stage's freshness is checked once."""
    from finetune.recipe import get_key
    from finetune.run import freshness

    if stage == "plan":
        return Upstream()
    if stage not in freshness.BY_NAME:
        raise ValueError(f"unknown stage {stage!r}")
    spec = freshness.BY_NAME[stage]
    optional = dict(spec.optional)
    checked: set[str] = set()
    records: dict[str, Artifact | None] = {}
    for name in spec.upstream:
        if name not in optional:
            records[name] = load(recipe, RECORDS[name], recipe_path, checked=checked)
        elif runs.read_manifest(recipe.run_dir(name)) is not None:
            key = optional[name]
            try:
                records[name] = load(recipe, RECORDS[name], recipe_path, fresh=bool(get_key(recipe.to_dict(), key)),
                                     checked=checked)
            except UserError as exc:
                raise UserError(f"{exc}; or go on without it: {key}=false") from None
    for name in spec.also_reads:
        records[name] = load_if_finished(recipe, RECORDS[name])
    return Upstream(prepared=records.get("prepare"), trained=records.get("train"), exported=records.get("export"))


# ------------------------------------------------------------------------------------- prepared rows
def split_rows(prepared: Prepared | None, split: str = "test") -> list[dict] | None:
    """The rows of one of prepare's splits (None when prepare has not run or the split is empty)."""
    path = prepared.splits.get(split) if prepared is not None else None
    if path is None or not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows or None


def trained_system_prompt(system_prompt: str | None, prepared: Prepared | None) -> str | None:
    """The system prompt the model learned its task with: ``system_prompt`` (data.system_prompt) when the recipe sets it, else the one
    more than half of the training rows carry (the quickstart's rows each hold "Summarize the ticket as JSON."),
    else None (the chat template's default, which it inserted in training too)."""
    if system_prompt:
        return system_prompt
    return dominant_system_prompt(split_rows(prepared, "train") or [])


def dominant_system_prompt(rows: list[dict]) -> str | None:
    """The system message more than half of the rows start with, else None."""
    from collections import Counter

    counts = Counter(row["messages"][0]["content"] for row in rows
                     if row.get("messages") and row["messages"][0].get("role") == "system"
                     and isinstance(row["messages"][0].get("content"), str))
    if not counts:
        return None
    text, n = counts.most_common(1)[0]
    return text if n * 2 > len(rows) else None
