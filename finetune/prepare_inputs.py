"""What prepared data is built from, by content: the data files (sha256), pinned Hub sources, the tokenizer's files,
the recipe's data section and seed, whether prompt-only rows are kept (train.objective grpo: ``prepare.keeps_prompts``)
and prepare's version. ``prepare`` records it in its manifest and reuses its outputs when it is unchanged;
``freshness`` asks ``stale_inputs`` why finished outputs no longer match.

Of the train section only that one yes/no is an input: switching train.objective to or from grpo rebuilds the
prepared data, switching between two other objectives (sft to orpo, say) does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.run import runs

# Bump when the output of prepare changes for the same inputs, so old caches are rebuilt.
PREPARE_VERSION = 2


def fingerprint_inputs(recipe, tokenizer_dir: Path) -> dict[str, Any]:
    """Everything prepare's output depends on. Unpinned Hub sources make the output not reusable."""
    files = _source_fingerprints(recipe)
    for i, f in enumerate(files):
        if f.get("sha256") == "missing":
            raise UserError(f"data.sources[{i}].path: file not found: {f['path']} "
                            "(relative paths are resolved against the recipe's folder)")
    # without a pinned revision the Hub data may have changed
    reusable = all(f.get("revision") is not None for f in files if "hub" in f)
    tokenizer = tokenizer_fingerprint(tokenizer_dir, recipe.chat_template_path())
    return {"fingerprint": _input_key(recipe, files, tokenizer), "sources": files, "tokenizer": tokenizer,
            "tokenizer_dir": str(tokenizer_dir), "prompt_only": keeps_prompt_only(recipe), "version": PREPARE_VERSION,
            "reusable": reusable}


def keeps_prompt_only(recipe) -> bool:
    """Whether prepare keeps prompt-only rows and the reward functions' columns for this recipe (its rule,
    ``prepare.keeps_prompts``, reads train.objective)."""
    from finetune.prepare import keeps_prompts

    return keeps_prompts(recipe)


def _source_fingerprints(recipe) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = []
    for src in recipe.data.sources:
        if src.path is not None:
            path = recipe.resolve_path(src.path)
            if path.is_dir():
                raise UserError(f"data.sources: {path} is a folder; name a data file in it (.jsonl, .json, .csv, "
                                ".parquet, .txt)")
            files.append({"path": str(path), "sha256": runs.file_fingerprint(path) if path.is_file() else "missing"})
        else:
            files.append({"hub": src.hub, "config": src.config, "split": src.split, "revision": src.revision})
    return files


def tokenizer_fingerprint(tokenizer_dir: Path, chat_template: Path | None = None) -> dict[str, str]:
    """The tokenizer's identity: sha256 of its files (vocabulary, special tokens, chat template), and of the
    template file that replaces the model's own (model.chat_template)."""
    tok_files = sorted(p for p in Path(tokenizer_dir).iterdir()
                       if p.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")))
    out = {p.name: runs.file_fingerprint(p) for p in tok_files}
    if chat_template is not None:
        out["model.chat_template"] = runs.file_fingerprint(chat_template) if chat_template.is_file() else "missing"
    return out


def _input_key(recipe, files: list[dict[str, Any]], tokenizer: dict[str, str]) -> str:
    # prompt_only only when true, so that data prepared for the other objectives keeps its fingerprint
    kept = {"prompt_only": True} if keeps_prompt_only(recipe) else {}
    return runs.fingerprint_json({"version": PREPARE_VERSION, "data": recipe.data.model_dump(mode="json"),
                                  "seed": recipe.seed, "sources": files, "tokenizer": tokenizer, **kept})


def stale_inputs(recipe, manifest: dict[str, Any]) -> str | None:
    """Why prepare's finished outputs no longer match the data files, the tokenizer or whether prompt-only rows are
    kept; None if they do. (The recipe's data section and seed are compared by the caller.) Every call hashes the
    local data files: runs.file_fingerprint took 1.6 s for a 1 GiB file here (2 shared cores), and there is no
    modification-time shortcut that a copied or restored file could fool."""
    from finetune import models

    recorded = manifest.get("inputs") or {}
    kept = keeps_prompt_only(recipe)
    if "fingerprint" in recorded and bool(recorded.get("prompt_only")) != kept:
        return (f"train.objective is {recipe.train.objective} now, and prompt-only rows are kept only for grpo "
                f"(the data was prepared {'without' if kept else 'with'} them)")
    files = None
    if "sources" in recorded or "fingerprint" in recorded:
        files = _source_fingerprints(recipe)
        for old, now in zip(recorded.get("sources") or [], files, strict=False):
            if "path" in now and now["sha256"] == "missing":
                return f"data file {now['path']} is missing"
            if "path" in now and old.get("sha256") != now["sha256"]:
                return f"the content of data file {now['path']} changed"
    if "tokenizer" in recorded or "fingerprint" in recorded:
        resolved = models.resolve_model(recipe.model, recipe.base_dir)
        tokenizer = tokenizer_fingerprint(resolved.path, recipe.chat_template_path())
        if "tokenizer" in recorded and recorded["tokenizer"] != tokenizer:
            return f"the tokenizer (model.id {recipe.model.id}) changed"
        if "fingerprint" in recorded and recorded["fingerprint"] != _input_key(recipe, files or [], tokenizer):
            return "the inputs changed (data files, tokenizer or finetune's prepare version)"
    return None
