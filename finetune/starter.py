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

import yaml

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
    return round(share, 2), round(share, 2)


def init_recipe(data: str, model: str, *, check: Callable[[Any], list[str]], out: str | None = None,
                gpu_gb: float | None = None) -> Written:
    """Write a recipe for ``data`` (a local file) and ``model`` to ``out`` (default: <data stem>.yaml in the
    current folder) if ``check`` (``finetune validate``'s checks: a loaded recipe -> its problems) finds no problem;
    an existing file is never replaced."""
    from finetune.data import load

    data_path = Path(data).expanduser()
    loaded = load.read_local(data_path, where="finetune init DATA")
    if not loaded.rows:
        raise UserError(f"{data}: no rows to train on")
    fmt, columns = ("text", {}) if data_path.suffix.lower() == ".txt" else detect(
        [r.record for r in loaded.rows[:100]], loaded.name)
    target = Path(out) if out else Path.cwd() / f"{_name(data_path.stem)}.yaml"
    if target.exists():
        raise UserError(f"{target}: already exists and is left as it is; give another name with -o")
    validation, test = split_for(len(loaded.rows))
    source: dict[str, Any] = {"path": _relative(data_path, target.parent), "format": fmt}
    if columns:
        source["columns"] = columns
    raw: dict[str, Any] = {"name": _name(target.stem),
                           **({"card_gb": int(gpu_gb)} if gpu_gb is not None and gpu_gb == int(gpu_gb) else {}),
                           "model": {"id": model},
                           "data": {"sources": [source], "split": {"validation": validation, "test": test}},
                           "train": {"method": "lora"}}
    if fmt in ("preference", "kto"):
        raw["train"]["objective"] = "dpo" if fmt == "preference" else "kto"
    why = fit_to_memory(raw, target.parent, gpu_gb)
    header = [f"{raw['name']}: {model} fine-tuned on {data_path.name} ({len(loaded.rows)} rows, {fmt} format"
              + (f", columns {columns}" if columns else "") + "), written by `finetune init`.",
              f"train: {why}.", "Next: `finetune run` on this file (or prepare, train, eval, export one by one). Every "
              "key not set here has its default (docs/recipe-reference.md)."]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    _write_checked(text, target, check)
    return Written(target, len(loaded.rows), fmt, raw["train"]["method"], why)


def detect(records: list[dict], name: str) -> tuple[str, dict[str, str]]:
    """The rows' format and column mapping: prepare's detection; for other columns, the question-like and
    answer-like ones it would suggest (formats.PROMPT_LIKE, ANSWER_LIKE) as prompt and completion."""
    from finetune.data import formats

    try:
        return formats.detect_format(records, {}, source=name, where="finetune init"), {}
    except UserError:
        lower = {k.lower(): k for k in formats.column_names(records)}
        prompt = next((lower[c] for c in formats.PROMPT_LIKE if c in lower), None)
        answer = next((lower[c] for c in formats.ANSWER_LIKE if c in lower and lower[c] != prompt), None)
        if not (prompt and answer):
            raise
    columns = {"prompt": prompt, "completion": answer}
    return formats.detect_format(records, columns, source=name, where="finetune init"), columns


def _name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return name or "my-recipe"


def _relative(path: Path, folder: Path) -> str:
    """The data file as the recipe names it: relative to the recipe's folder when it is inside it, else absolute."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def fit_to_memory(raw: dict[str, Any], base_dir: Path, gpu_gb: float | None) -> str:
    """Let `finetune plan` size the raw recipe for this machine (or a ``gpu_gb`` card): LoRA as it is when it fits,
    else with the planner's changes up to the first that fits, in its order of least quality cost (a smaller
    micro-batch with more accumulation, gradient checkpointing, 8-bit AdamW, QLoRA on a GPU, shorter sequences),
    written into ``raw``. Returns what was decided, in words."""
    from finetune import plan, recipe

    where = f"a GPU with {gpu_gb:g} GB" if gpu_gb is not None else "this machine"
    try:
        result = plan.run(recipe.validate_dict(raw, source="finetune init", base_dir=base_dir),
                          gpu_gb=gpu_gb)["results"][0]
    except UserError as exc:
        return f"LoRA, not sized for {where} ({exc}); run `finetune plan` on this file once the model's config is at hand"
    budget = plan.gib(result["budget"])
    if result["fits"]:
        return f"LoRA; `finetune plan` estimates {plan.gib(result['estimate']['total'])} of {budget} on {where}"
    if not result["suggestions"] or not result["suggestions"][-1]["fits"]:
        return (f"LoRA, which does not fit {where} by `finetune plan` ({plan.gib(result['estimate']['total'])} of "
                f"{budget}, and no change it knows makes it fit); pick a smaller model or a larger card")
    changes = [o for s in result["suggestions"] for o in s["overrides"]]
    for change in changes:  # each on top of the previous: a later value of the same key wins
        key, _, value = change.partition("=")
        recipe.set_key(raw, key, yaml.safe_load(value))
    final = dict(c.partition("=")[::2] for c in changes)
    method = {"lora": "LoRA", "qlora": "QLoRA"}.get(raw["train"]["method"], raw["train"]["method"])
    return (f"{method}, sized by `finetune plan` for {where}: "
            f"{' '.join(f'{k}={v}' for k, v in final.items())} ({plan.gib(result['suggestions'][-1]['total'])} of "
            f"{budget})")


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

