"""Starting points for a newcomer: the shipped recipes (``finetune recipes``, ``finetune recipes copy``) and a recipe
written from one's own data file and a model (``finetune init``).

Nothing here overwrites a file: a copy or a new recipe goes only where no file is. ``init`` decides nothing of its
own: the format is the data loader's detection (finetune/data/formats.py), the method the planner's estimate
(finetune/plan.py) for this machine or a named card, and the result passes the checks of ``finetune validate``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Recipe folders that hold other things than recipes (accelerate launch configs).
NOT_RECIPES = ("accelerate",)


@dataclass
class Shipped:
    name: str  # the path under recipes/ without .yaml: quickstart, tasks/my-data, models/qwen3-1.7b-lora-8gb
    path: Path
    about: str  # the first line of its header comment (else its description:)


def shipped_recipes(root: Path = RECIPES_DIR) -> list[Shipped]:
    """The recipes under recipes/, the top folder first, then each folder in name order."""
    if not root.is_dir():
        raise UserError(f"{root}: no recipes folder; the shipped recipes come with a clone of the repository "
                        "(git clone, then `make install`)")
    files = [p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] not in NOT_RECIPES]
    files.sort(key=lambda p: (len(p.relative_to(root).parts) > 1, str(p.relative_to(root))))
    return [Shipped(p.relative_to(root).with_suffix("").as_posix(), p, _about(p)) for p in files]


def _about(path: Path) -> str:
    """A recipe's first sentence of its header comment, else its description: value, else ''."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#") or (header and not line.lstrip("#").strip()):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(h for h in header if h)
    if text:
        end = re.search(r"\.(\s|$)", text)
        return text[:end.start() + 1] if end else text
    found = next((line for line in lines if line.startswith("description:")), "")
    return found.partition(":")[2].strip().strip("'\"")


def find_shipped(name: str, root: Path = RECIPES_DIR) -> Shipped:
    """A shipped recipe by its name (quickstart, tasks/my-data), its file name, or recipes/ path."""
    recipes = shipped_recipes(root)
    wanted = name.removeprefix("recipes/").removesuffix(".yaml")
    matches = [r for r in recipes if wanted in (r.name, r.name.rsplit("/", 1)[-1])]
    if len(matches) == 1:
        return matches[0]
    import difflib

    if matches:
        raise UserError(f"{name}: several shipped recipes have that name ({', '.join(r.name for r in matches)}); "
                        "give the one you mean")
    close = difflib.get_close_matches(wanted, [r.name for r in recipes], n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"{name}: no shipped recipe by that name; {hint}`finetune recipes` lists them")


def copy_recipe(name: str, dest: str | None, root: Path = RECIPES_DIR) -> tuple[Path, list[tuple[Path, Path]]]:
    """Copy a shipped recipe to ``dest`` (a file, or a folder to put it in; default: the current folder). Returns
    the copy and, for each local file the recipe reads by a relative path that does not resolve from the copy's
    folder, (the shipped file, where the copy looks for it)."""
    from finetune import recipe

    src = find_shipped(name, root)
    target = Path(dest) if dest else Path.cwd()
    if target.is_dir() or (dest or "").endswith(("/", os.sep)):
        target = target / src.path.name
    if target.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"{dest}: a recipe file name ends in .yaml; give e.g. {target.with_suffix('.yaml').name}")
    if target.exists():
        raise UserError(f"{target}: already exists and is left as it is; give another file name or folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "x", encoding="utf-8") as f:  # "x": never over a file that appeared meanwhile
        f.write(src.path.read_text(encoding="utf-8"))
    loaded = recipe.load(src.path)
    missing = [(loaded.resolve_path(p), (target.parent / p).resolve()) for p in local_references(loaded)
               if not (target.parent / p).exists()]
    return target, missing


def local_references(r) -> list[str]:
    """The relative file paths a recipe reads: its data files and its chat template."""
    paths = [s.path for s in r.data.sources if s.path is not None]
    paths += [r.model.chat_template] if r.model.chat_template else []
    return [p for p in paths if not Path(p).expanduser().is_absolute()]


# ------------------------------------------------------------------------------------------------------ init
@dataclass
class Written:
    path: Path
    rows: int
    format: str
    method: str
    why: str  # how the planner chose the method (or why it could not)


def split_for(rows: int) -> tuple[float, float]:
    """(validation, test) shares: about 50 examples each for small data (eval needs a test split, train's
    validation loss a validation one), 5 % each from 1,000 rows on, never below 1 row each."""
    if rows < 20:
        raise UserError(f"{rows} rows: too few to split into training, validation and test examples; fine-tuning "
                        "needs at least 20 (a few hundred to learn a skill)")
    share = 0.05 if rows >= 1000 else max(0.1, min(0.2, 50 / rows))
    return round(share, 3), round(share, 3)


def init_recipe(data: str, model: str, *, check: Callable[[Any], list[str]], out: str | None = None,
                gpu_gb: float | None = None) -> Written:
    """Write a recipe for ``data`` (a local file) and ``model`` to ``out`` (default: <data stem>.yaml in the
    current folder) if ``check`` (``finetune validate``'s checks: a loaded recipe -> its problems) finds no problem;
    an existing file is never replaced."""
    from finetune.data import formats, load

    data_path = Path(data).expanduser()
    loaded = load.read_local(data_path, where="DATA")
    if not loaded.rows:
        raise UserError(f"{data}: no rows to train on")
    fmt = "text" if data_path.suffix.lower() == ".txt" else formats.detect_format(
        (r.record for r in loaded.rows[:100]), {}, source=loaded.name, where="DATA")
    target = Path(out) if out else Path.cwd() / f"{_name(data_path.stem)}.yaml"
    if target.exists():
        raise UserError(f"{target}: already exists and is left as it is; give another name with -o")
    validation, test = split_for(len(loaded.rows))
    fields = {"name": _name(target.stem), "model": model, "data": os.path.relpath(data_path.resolve(),
                                                                                   target.parent.resolve()),
              "format": fmt, "validation": validation, "test": test,
              "objective": {"preference": "dpo", "kto": "kto"}.get(fmt, "sft"), "card_gb": gpu_gb}
    method, why = choose_method(fields, target.parent, gpu_gb)
    text = recipe_text(fields, method, why, rows=len(loaded.rows))
    _write_checked(text, target, check)
    return Written(target, len(loaded.rows), fmt, method, why)


def _name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return name or "my-recipe"


def _recipe(fields: dict, method: str, base_dir: Path):
    from finetune import recipe

    data = {"name": fields["name"], "model": {"id": fields["model"]},
            "data": {"sources": [{"path": fields["data"], "format": fields["format"]}],
                     "split": {"validation": fields["validation"], "test": fields["test"]}},
            "train": {"method": method, "objective": fields["objective"]}}
    return recipe.validate_dict(data, source="finetune init", base_dir=base_dir)


def choose_method(fields: dict, base_dir: Path, gpu_gb: float | None) -> tuple[str, str]:
    """LoRA when the planner says it fits this machine (or the named card); else QLoRA on a GPU when that fits;
    else LoRA with what the planner says to change. A model whose config cannot be read leaves LoRA unplanned."""
    from finetune import plan

    where = f"a {gpu_gb:g} GB GPU" if gpu_gb is not None else "this machine"
    tried, lora = [], None
    for method in ("lora", "qlora"):
        try:
            result = plan.run(_recipe(fields, method, base_dir), gpu_gb=gpu_gb)["results"][0]
        except UserError as exc:
            return "lora", f"not planned ({exc}); run `finetune plan` on the recipe once the model's config is at hand"
        lora = lora or result
        total = plan.gib(result["estimate"]["total"])
        if result["fits"]:
            return method, f"`finetune plan` estimates {total} peak on {where} ({plan.gib(result['budget'])} usable)"
        tried.append(f"{method} {total}")
        if result["device"] != "cuda":
            break  # qlora needs a CUDA GPU
    fix = []  # the planner's suggestions apply each on top of the previous: all of them up to the first that fits
    for suggestion in lora["suggestions"]:
        fix += suggestion["overrides"]
        if suggestion["fits"]:
            break
    else:
        fix = []
    return "lora", (f"does not fit {where} by `finetune plan` ({', '.join(tried)}); "
                    + (f"it fits with the overrides {' '.join(fix)}" if fix else "pick a smaller model or a larger card"))


def recipe_text(fields: dict, method: str, why: str, *, rows: int) -> str:
    """The recipe's YAML: a header saying how it was made, then only the keys init chose (the rest are defaults,
    listed in docs/recipe-reference.md)."""
    card = f"card_gb: {fields['card_gb']:g}\n" if fields["card_gb"] is not None and fields["card_gb"] == int(
        fields["card_gb"]) else ""
    return (f"# {fields['name']}: {fields['model']} fine-tuned on {Path(fields['data']).name} ({rows} rows, "
            f"{fields['format']} format), written by `finetune init`.\n"
            f"# train.method {method}: {why}.\n"
            f"# Next: finetune run {fields['name']}.yaml  (or prepare, train, eval, export one by one); every key "
            "not set here has its default (docs/recipe-reference.md).\n"
            f"name: {fields['name']}\n{card}"
            f"model:\n  id: {_quote(fields['model'])}\n"
            f"data:\n  sources:\n    - path: {_quote(fields['data'])}   # relative to this file\n"
            f"      format: {fields['format']}   # detected from the columns\n"
            f"  split:\n    validation: {fields['validation']}\n    test: {fields['test']}\n"
            f"train:\n  method: {method}\n" + (f"  objective: {fields['objective']}\n"
                                               if fields["objective"] != "sft" else ""))


def _quote(value: str) -> str:
    import json

    return json.dumps(value)


def _write_checked(text: str, target: Path, check: Callable[[Any], list[str]]) -> None:
    """Load the recipe from a file beside the target (so its relative paths hold) and check it, then put it in
    place only if no file is there."""
    from finetune import recipe

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".init-", suffix=".yaml", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        problems = check(recipe.load(tmp))
        if problems:
            raise UserError(f"the written recipe would not validate: {'; '.join(problems)}")
        try:
            os.link(tmp, target)  # fails if a file appeared at target meanwhile: never replaced
        except FileExistsError:
            raise UserError(f"{target}: already exists and is left as it is; give another name with -o") from None
        except OSError:  # a file system without hard links
            with open(target, "x", encoding="utf-8") as f:
                f.write(text)
    finally:
        os.unlink(tmp)

