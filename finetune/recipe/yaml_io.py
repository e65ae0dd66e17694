"""A recipe as text: the YAML file read with the line of every key (YAML 1.2 floats; a data file given where a recipe
goes is named as such), the recipe files under a folder, and dotted keys on the raw mapping (``train.lr=1e-4``
overrides, ``data.sources.0.path``: list items by number). Nothing here validates: ``finetune.recipe`` does.

A key that takes text (``_wants_text``: a ``str`` key, or one whose allowed values are strings, such as
``train.gradient_checkpointing: on | off | auto``) reads what YAML 1.1 would make a boolean (on/off, yes/no,
true/false) as the text written, in a recipe file and in an override alike; an override also reads a number there
as its text. Every other key keeps YAML's value, so a boolean given to a number is still an error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from finetune.recipe.errors import OVERRIDE_PREFIX, RecipeError, _section_type


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1, plus YAML 1.2 floats: ``1e-4`` is a number (YAML 1.1 reads it as text)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

# Files that hold data, not a recipe; and keys that say a YAML/JSON document is a data row.
DATA_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")
DATA_KEYS = frozenset({"messages", "conversations", "instruction", "output", "prompt", "completion", "text"})


def _looks_like_data(path: Path, text: str | None, data: Any = None, *,
                     recipe_keys: frozenset[str] = frozenset()) -> RecipeError | None:
    """The error for a data file given where a recipe goes, or None when it does not look like one
    (``recipe_keys``: the top-level keys of a recipe, which a data row does not have)."""
    if path.suffix.lower() in DATA_SUFFIXES:
        seen = f"a {path.suffix} file"
    elif isinstance(data, dict) and data and not set(data) & recipe_keys and set(data) & DATA_KEYS:
        seen = f"a data row (keys: {', '.join(map(str, list(data)[:5]))})"
    elif isinstance(data, list) and data and all(isinstance(r, dict) and set(r) & DATA_KEYS
                                                 and not set(r) & recipe_keys for r in data[:10]):
        seen = f"a list of {len(data)} records"
    elif text is not None and data is None and text.lstrip().startswith("{") and _first_line_is_json(text):
        seen = "JSON lines"
    else:
        return None
    return RecipeError(str(path), [
        f"this looks like a data file ({seen}), not a recipe. A recipe names it under data.sources: copy "
        f"recipes/tasks/my-data.yaml and set `data: {{sources: [{{path: {path.resolve()}}}]}}`, then pass that recipe"])


def _first_line_is_json(text: str) -> bool:
    import json

    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _key_lines(node: Any, path: tuple = (), out: dict[tuple, int] | None = None) -> dict[tuple, int]:
    """Key path (as strings, list items by number) -> line in the file, from the composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (str(key.value),)
            out[sub] = key.start_mark.line + 1
            _key_lines(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = path + (str(i),)
            out[sub] = item.start_mark.line + 1
            _key_lines(item, sub, out)
    return out


def _bool_words(node: Any, data: Any, path: tuple = (), out: list | None = None) -> list[tuple[tuple, Any, Any, str]]:
    """(key path, the container in ``data``, its key, the word) of every plain scalar YAML 1.1 read as a boolean
    (on, off, yes, no, true, false), walking the node tree beside the constructed data."""
    out = [] if out is None else out
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if isinstance(name, str) and name in data:
                _bool_words(value, data[name], path + (name,), out)
                if isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:bool" and value.style is None:
                    out.append((path + (name,), data, name, value.value))
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, (item, got) in enumerate(zip(node.value, data, strict=False)):
            _bool_words(item, got, path + (str(i),), out)
            if isinstance(item, yaml.ScalarNode) and item.tag == "tag:yaml.org,2002:bool" and item.style is None:
                out.append((path + (str(i),), data, i, item.value))
    return out


def read_document(path: Path, recipe_keys: frozenset[str] = frozenset(), schema: type[BaseModel] | None = None
                  ) -> tuple[dict[str, Any], dict[tuple, int]]:
    """The recipe file as a mapping, and the line of each key. Anything that is not a recipe is a RecipeError
    (``recipe_keys``: the schema's top-level keys, to tell a data row from a recipe). A boolean word at a key of
    ``schema`` (the recipe's, unless given) that takes text is read as the word written (``_wants_text``)."""
    if not path.exists():
        twin = path.with_suffix({".yaml": ".yml", ".yml": ".yaml"}.get(path.suffix.lower(), ".yaml"))
        if twin != path and twin.is_file():
            raise RecipeError(str(path), [f"file not found, but {twin} exists (.yml and .yaml are different names); "
                                          f"give that path"])
        raise RecipeError(str(path), ["file not found; give the path to a recipe YAML, e.g. recipes/quickstart.yaml"])
    if path.is_dir():
        raise RecipeError(str(path), ["is a folder; give the path to a recipe YAML file "
                                      "(`finetune validate FOLDER` checks every recipe in it)"])
    not_data = _looks_like_data(path, None)
    if not_data is not None:
        raise not_data
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        from finetune.data.load import other_unicode

        encoding = other_unicode(path.read_bytes())
        found = f"{encoding} text" if encoding else f"not UTF-8 text (byte {exc.start})"
        raise RecipeError(str(path), [f"{found}; save the recipe as UTF-8"]) from None
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        not_data = _looks_like_data(path, text)
        if not_data is not None:
            raise not_data from None
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    finally:
        loader.dispose()
    if data is None:
        raise RecipeError(str(path), ["the file is empty (no keys); a recipe needs at least `name:` and "
                                      "`data: {sources: [{path: your.jsonl}]}`, see recipes/quickstart.yaml"])
    not_data = _looks_like_data(path, text, data, recipe_keys=recipe_keys)
    if not_data is not None:
        raise not_data
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"the top level is a {type(data).__name__}, but a recipe is a mapping of keys "
                                      "(name:, model:, data:, train:, ...), see recipes/quickstart.yaml"])
    words = _bool_words(node, data)
    if words:
        if schema is None:
            from finetune.recipe import Recipe as schema
        for parts, container, key, word in words:
            if _wants_text(list(parts), schema):
                container[key] = word  # `gradient_checkpointing: off` is the text "off"
    return data, _key_lines(node)


def read_yaml(path: Path) -> dict[str, Any]:
    return read_document(path)[0]


# Folders under a recipes directory that hold other files: data, and accelerate launch configs.
NOT_RECIPE_FOLDERS = frozenset({"data", "accelerate"})


def recipe_files(root: Path) -> list[Path]:
    """The recipe YAML files under a directory, recursively (data and accelerate-config folders aside)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.y*ml") if not NOT_RECIPE_FOLDERS & set(p.relative_to(root).parts[:-1]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are parsed as YAML scalars or [flow, lists]."""
    if "=" not in text:
        raise RecipeError("override", [f"{OVERRIDE_PREFIX}{text!r}: expected key=value, e.g. train.lr=1e-4"])
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_0-9]+)*", key):
        raise RecipeError("override", [f"{OVERRIDE_PREFIX}{text!r}: {key!r} is not a dotted key like train.lr "
                                       "(list items by number: data.sources.0.path)"])
    try:
        value = yaml.load(raw, Loader=YamlLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # `serve.host=::` is text, not a YAML mapping
    return key.split("."), value


def _value_types(annotation: Any) -> set[Any]:
    """The types of the values a field's annotation allows: a Literal's values give theirs (``Literal["on", "off"]``:
    str), unions, Annotated and containers (list[str]: str) their members'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {type(v) for v in args}
    if origin is Annotated:
        return _value_types(args[0])
    if not args:
        return {annotation}
    return set().union(*(_value_types(arg) for arg in args))


def _wants_text(parts: list[str], schema: type[BaseModel]) -> bool:
    """Whether the key accepts text but no number or boolean: a str key (model.revision, serve.api_key, name, ...)
    or one whose allowed values are strings (train.gradient_checkpointing: auto | on | off, train.method, ...)."""
    current: Any = schema
    annotation: Any = None
    for part in parts:
        if part.isdigit():
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return False
        annotation = current.model_fields[part].annotation
        current = _section_type(annotation)
    kinds = _value_types(annotation)
    return str in kinds and not kinds & {int, float, bool}


def get_key(data: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a raw recipe (``train.lora.r``), or None where a part is missing."""
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key in a raw recipe, as an override ``dotted=value`` would."""
    _set_key(data, dotted.split("."), value, f"{dotted}={value}")


def flat_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a raw recipe (an empty section is a leaf)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_key(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set a dotted key in the raw recipe; a number names a list item (the next number adds one)."""
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth])
        if isinstance(node, list):
            if not part.isdigit():
                raise RecipeError("override", [f"{OVERRIDE_PREFIX}{text!r}: {where} is a list; name an item by its "
                                               f"number, e.g. {where}.0.{part}"])
            index = int(part)
            if index > len(node):
                have = f"items 0 to {len(node) - 1}" if node else "no items"
                raise RecipeError("override", [f"{OVERRIDE_PREFIX}{text!r}: {where} has {have}; use {where}."
                                               f"{len(node)}.<key>=... to add one"])
            if index == len(node):
                node.append(None)
        elif not isinstance(node, dict):
            raise RecipeError("override", [f"{OVERRIDE_PREFIX}{text!r}: {where} is a single value "
                                           f"({node!r}), not a section"])
        slot: Any = int(part) if isinstance(node, list) else part
        if last:
            node[slot] = value
            return
        child = node[slot] if isinstance(node, list) else node.get(slot)
        if not isinstance(child, (dict, list)):
            child = [] if parts[depth + 1].isdigit() else {}
            node[slot] = child
        node = child


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type[BaseModel]) -> dict[str, Any]:
    """A copy of the raw recipe with the overrides applied (not validated); ``schema`` says which keys take text.
    A ``path`` given to a source that reads the Hub replaces its ``hub`` (and a ``hub`` a ``path``): see
    ``_replace_location``."""
    data = _deepcopy(data)
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, parts, value in parsed:
        if value is not None and not isinstance(value, (str, list, dict)) and _wants_text(parts, schema):
            value = text.partition("=")[2].strip()  # `model.revision=2024` is the text "2024"
        _set_key(data, parts, value, text)
        if len(parts) == 4 and parts[:2] == ["data", "sources"] and parts[3] in ("path", "hub") and value is not None:
            given = {p[3] for _, p, _ in parsed if len(p) == 4 and p[:3] == parts[:3]}
            _replace_location(data, int(parts[2]) if parts[2].isdigit() else -1, parts[3], given)
    return data


# Keys of a source that describe where a Hub dataset's rows are, and mean nothing (or else) for a local file.
HUB_SOURCE_KEYS = ("hub", "config", "split", "revision", "streaming", "format", "columns")


def _replace_location(data: dict[str, Any], index: int, given: str, keep: set[str]) -> None:
    """A source given ``path`` on the command line reads that file instead of its Hub dataset: the Hub keys go
    (the file's format is detected, its columns are its own), and ``hub`` given to a file source drops ``path``,
    unless an override sets them too. Said in one warning line, so the recipe that runs is the one the user sees."""
    import warnings

    sources = (data.get("data") or {}).get("sources")
    source = sources[index] if isinstance(sources, list) and 0 <= index < len(sources) else None
    if not isinstance(source, dict):
        return
    other = "hub" if given == "path" else "path"
    if source.get(other) is None:
        return
    dropped = {k: source.pop(k) for k in (HUB_SOURCE_KEYS if given == "path" else ("path",))
               if k in source and k not in keep}
    listed = ", ".join(f"{k}: {v}" for k, v in dropped.items())
    warnings.warn(f"data.sources.{index}.{given} replaces the source's {other}; dropped {listed} (set any that still "
                  f"applies again: data.sources.{index}.KEY=...)", stacklevel=4)


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj
