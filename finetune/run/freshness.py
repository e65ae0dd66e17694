"""When a stage's finished outputs are still current: the stage table and the staleness rules.

A stage is up to date when its manifest exists, the recipe sections it reads are the same as when it ran (the
manifest records the resolved recipe), what it was built from has not changed since - for prepare, the content
of the local data files and the tokenizer (sha256, never modification times) and whether it keeps prompt-only rows
(train.objective grpo or not: finetune.prepare_inputs); for the others, the manifests of the stages upstream of it,
recorded in its own manifest when it ran - and the same holds for those upstream stages. Every reader of a stage's
outputs goes through ``require_fresh`` (via ``finetune.run.artifacts.load``), so a stage run by hand refuses stale
inputs instead of using them, with the command that rebuilds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetune import prepare_inputs
from finetune.errors import UserError
from finetune.recipe import Recipe, get_key
from finetune.run import runs


@dataclass(frozen=True)
class Stage:
    name: str          # folder under runs/<name>/ and the CLI command
    module: str        # the module whose run(recipe, upstream) does the work
    sections: tuple[str, ...]   # recipe keys whose change makes the stage stale
    upstream: tuple[str, ...]   # stages whose outputs it reads (fresh), and whose reruns make it stale
    # upstream stages read only when they have run, and needed fresh only while this recipe key is on
    optional: tuple[tuple[str, str], ...] = ()
    also_reads: tuple[str, ...] = ()  # read when finished, freshness not checked (and no staleness from them)


STAGES = (
    # prepare depends on the model only through its tokenizer, whose files it fingerprints, and on the train section
    # only through whether train.objective is grpo (prompt-only rows kept or not): prepare_inputs.stale_inputs
    Stage("prepare", "finetune.prepare", ("data", "seed"), ()),
    Stage("train", "finetune.train", ("model", "train", "seed"), ("prepare",)),
    # export: prepare's splits (not their freshness) give the parity checks' held-out rows and the calibration text
    Stage("export", "finetune.export", ("model", "export"), ("train",), also_reads=("prepare",)),
    # eval: the export is read (and recorded, so a later export makes eval stale) whenever it has run; it must be
    # fresh only while eval.gguf scores it
    Stage("eval", "finetune.evaluate", ("model", "eval", "seed"), ("prepare", "train", "export"),
          optional=(("export", "eval.gguf"),)),
)
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES} | {"tune": Stage("tune", "finetune.tune", ("tune",), ("prepare",))}
OUTPUT_NAMES = {"prepare": "prepared data", "train": "the trained model", "export": "the exported GGUF"}
changed_keys = runs.changed_keys


# ------------------------------------------------------------------------------------------ staleness
def _time(text: str | None) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp() if text else None
    except ValueError:
        return None


def why_stale(recipe: Recipe, stage: Stage) -> str | None:
    """None when the stage's finished outputs still match the recipe and what they were built from, else why
    not ("data.system_prompt changed", "data file x.jsonl changed", "prepare ran since", ...). Upstream stages
    are not checked here (``require_fresh`` and ``run`` walk the chain)."""
    manifest = runs.read_manifest(recipe.run_dir(stage.name))
    if manifest is None:
        return "not run yet"
    current = recipe.to_dict()
    diff = [key for dotted in stage.sections
            for key in changed_keys(get_key(manifest.get("recipe") or {}, dotted), get_key(current, dotted), dotted)]
    if diff:
        return ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "") + " changed"
    if stage.name == "prepare":
        reason = prepare_inputs.stale_inputs(recipe, manifest)
        if reason:
            return reason
    recorded = (manifest.get("inputs") or {}).get("upstream")
    for up in stage.upstream:
        now = runs.read_manifest(recipe.run_dir(up))
        if recorded is None:
            # Written without an upstream record (by an older finetune, or by hand): go by finishing order.
            started, finished = _time(manifest.get("started")), _time((now or {}).get("finished"))
            if now is not None and (started is None or finished is None or finished > started):
                return f"{up} ran since"
        elif recorded.get(up) != runs.manifest_id(now):
            return f"{up} ran since" if now is not None else f"the {up} outputs it used are gone"
    return None


def require_fresh(recipe: Recipe, name: str, recipe_path: str = "RECIPE", *,
                  checked: set[str] | None = None) -> dict[str, Any]:
    """The manifest of a finished stage whose outputs still match the recipe and their inputs, as do the stages
    before it. Otherwise a UserError: "prepared data is stale because X changed: run `finetune prepare R`".
    ``checked``: stages a reader already found fresh (skipped; this one is added once fresh), so that reading
    prepare, train and export checks prepare's data fingerprints once, not three times."""
    checked = set() if checked is None else checked
    manifest = runs.require_stage(recipe, name, recipe_path)
    if name in checked:
        return manifest
    for up in BY_NAME[name].upstream:
        if up not in checked and (recipe.run_dir(up) / "manifest.json").exists():
            require_fresh(recipe, up, recipe_path, checked=checked)
    reason = why_stale(recipe, BY_NAME[name])
    if reason is not None:
        raise UserError(f"{OUTPUT_NAMES.get(name, name + ' outputs')} is stale because {reason}: run "
                        f"`finetune {name} {recipe_path}`" + (" (or `finetune run`, which rebuilds what is stale)"
                                                              if name in STAGE_NAMES else ""))
    checked.add(name)
    return manifest
