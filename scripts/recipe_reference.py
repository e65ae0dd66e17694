"""Write docs/recipe-reference.md from the recipe schema (the pydantic models in finetune/recipe/).

Every section, key, type, default, bound and description comes from the schema itself, so the reference cannot say
something the validator does not do. tests/unit/test_docs.py checks that the committed file equals what this script
writes now: after changing a recipe key, run

    python scripts/recipe_reference.py            # rewrites docs/recipe-reference.md
    python scripts/recipe_reference.py --check    # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from finetune.recipe import Recipe  # noqa: E402

OUT = ROOT / "docs" / "recipe-reference.md"

HEADER = """\
# Recipe reference

<!-- Written by `python scripts/recipe_reference.py` from the schema in finetune/recipe/: do not edit by hand.
     tests/unit/test_docs.py fails when this file and the schema disagree. -->

A recipe is one YAML file; this page lists every key it can hold, section by section, with its type, its default
(what you get when the key is left out) and what it does. The schema is strict: an unknown key or a wrong type is an
error that names the key and its line, and types are never converted (`epochs: yes` and `batch_size: "8"` are
errors). Override any key on the command line with its dotted name (`train.lr=1e-4`, `data.sources.0.path=my.jsonl`);
`finetune show RECIPE` prints the resolved recipe. Relative paths are resolved against the recipe file's folder.
"""


def type_name(tp: Any) -> str:
    """A YAML-minded name for a type annotation: `"a" | "b"`, `int | null`, `list of str`, ..."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}s" if args and is_section(args[0]) else (
            f"list of {type_name(args[0])}" if args else "list")
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if is_section(tp):
        return "section"
    if tp is Any:
        return "any"
    return {str: "text", int: "integer", float: "number", bool: "true | false"}.get(tp, getattr(tp, "__name__", str(tp)))


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def default_text(info: FieldInfo) -> str:
    """The default as YAML would spell it, in backticks; `required` and `section` in words."""
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "section"
    return f"`{json.dumps(value)}`"


def bounds_text(info: FieldInfo) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    out = []
    for meta in info.metadata:
        for attr, sign in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def nested_model(tp: Any) -> tuple[type[BaseModel], str] | None:
    """The section model a field holds, with the suffix of its dotted name (`.0` items, `.<key>` entries)."""
    if is_section(tp):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and is_section(args[0]):
        return args[0], ".N"
    if origin is dict and len(args) == 2 and is_section(args[1]):
        return args[1], ".<key>"
    return None


def cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and `<` too, so that `runs/<name>/` is not read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    """One table for `model` (keys under `prefix`), then one for each section it holds, depth first."""
    title = f"`{prefix}`" if prefix else "Top level"
    doc = (model.__doc__ or "").strip() if model.__doc__ != BaseModel.__doc__ else ""
    out += ["", f"## {title}", ""]
    if doc and model is not Recipe:
        out += [doc.splitlines()[0], ""]
    out += ["| key | type | default | description |", "|---|---|---|---|"]
    children = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        nested = nested_model(info.annotation)
        kind = type_name(info.annotation)
        desc = info.description or ""
        if nested:
            child, suffix = nested
            children.append((child, key + suffix))
            where = f"see [`{key + suffix}`](#{anchor(key + suffix)})"
            desc = f"{desc} ({where})" if desc else where.capitalize()
        bounds = bounds_text(info)
        if bounds:
            kind = f"{kind} ({bounds})"
        default = default_text(info).replace("|", "\\|")
        out.append(f"| `{key}` | {cell(kind)} | {default} | {cell(desc)} |")
    for child, key in children:
        section(child, key, out)


def anchor(key: str) -> str:
    """The id mkdocs' toc gives the heading `## `key``: lower case, punctuation dropped, spaces as dashes."""
    return "".join(c for c in key.lower() if c.isalnum() or c in "_-")


def render() -> str:
    out = [HEADER.rstrip("\n")]
    section(Recipe, "", out)
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipe-reference.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
