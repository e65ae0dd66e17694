"""Read rows from local files (.jsonl .json .csv .tsv .parquet .txt) or a Hugging Face Hub dataset.

Every row keeps where it came from (``file.jsonl:17``) so a dropped row can be found again. JSON lines and CSV
are read here rather than through ``datasets`` because a bad line must be reported with its line number and the
rest of the file kept; Parquet goes through pyarrow (what ``datasets`` uses), the Hub through
``datasets.load_dataset``. Files are only read, never modified.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class RawRow:
    record: dict[str, Any]  # the row as read: column -> value (raw text rows: {"text": ...})
    origin: str             # "quickstart.jsonl:17", "data.csv:5", "hub:org/name[train]#12"


@dataclass
class Dropped:
    origin: str
    reason: str             # a stable key: "malformed_json", "empty_turn", "near_duplicate", ...
    detail: str = ""        # what exactly was wrong, for the report
    row: str = ""           # a short excerpt of the row


@dataclass
class Loaded:
    rows: list[RawRow] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    name: str = ""          # how the source is shown in messages and the report


def excerpt(value: Any, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_local(path: Path, *, where: str, max_rows: int | None = None) -> Loaded:
    """Rows of one local file. ``where`` names the recipe key for error messages (data.sources[0].path)."""
    if not path.exists():
        raise UserError(f"{where}: file not found: {path} (relative paths are resolved against the recipe's folder)")
    if path.is_dir():
        raise UserError(f"{where}: {path} is a folder; name one file ({', '.join(SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{where}: {path.name}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    loaded = Loaded(name=path.name)
    if suffix == ".parquet":
        rows = _read_parquet(path, where)
    else:
        text = _read_text(path, where)
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(text, path.name, loaded)
        elif suffix == ".json":
            rows = _read_json(text, path, where, loaded)
        elif suffix in (".csv", ".tsv"):
            rows = _read_csv(text, path.name, "\t" if suffix == ".tsv" else ",", loaded)
        else:
            rows = _read_txt(text, path.name)
    for row in rows:
        if max_rows is not None and len(loaded.rows) >= max_rows:
            break
        loaded.rows.append(row)
    return loaded


def read_hub(hub_id: str, *, config: str | None, split: str, revision: str | None, streaming: bool,
             max_rows: int | None, where: str) -> Loaded:
    """Rows of a Hub dataset split, via ``datasets.load_dataset`` (cached by datasets; streamed if asked)."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split, revision=revision, streaming=streaming)
    except (FileNotFoundError, ConnectionError) as exc:
        raise UserError(f"{where}: Hub dataset {hub_id!r} not found or not reachable ({exc}). Check the id; "
                        "without network, load it once with network access so the datasets cache has it, "
                        "or save it to a local file and use 'path:'.") from None
    except ValueError as exc:  # unknown split/config: datasets lists the valid ones in its message
        raise UserError(f"{where}: {hub_id}: {exc}") from None
    if max_rows is not None:
        ds = ds.take(max_rows) if streaming else ds.select(range(min(max_rows, len(ds))))
    loaded = Loaded(name=f"hub:{hub_id}[{split}]")
    for i, rec in enumerate(ds):
        loaded.rows.append(RawRow(dict(rec), f"{loaded.name}#{i}"))
    return loaded


# ----------------------------------------------------------------------------------------------- readers
def _read_text(path: Path, where: str) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UserError(f"{where}: {path.name} looks like a binary file (it contains NUL bytes), not "
                        f"{path.suffix} text. Point the recipe at the data file itself.")
    try:
        text = data.decode("utf-8-sig")  # a BOM from Excel/Notepad is fine
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{where}: {path.name} is not UTF-8 text (bad byte 0x{data[exc.start]:02x} at line {line}). "
                        "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`).") from None
    return text


def _read_jsonl(text: str, name: str, loaded: Loaded) -> Iterator[RawRow]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            loaded.dropped.append(Dropped(origin, "malformed_json", f"not valid JSON ({exc.msg}, column {exc.colno})",
                                          excerpt(line)))
            continue
        if not isinstance(rec, dict):
            loaded.dropped.append(Dropped(origin, "not_an_object", f"expected a JSON object, got {type(rec).__name__}",
                                          excerpt(line)))
            continue
        yield RawRow(rec, origin)


def _read_json(text: str, path: Path, where: str, loaded: Loaded) -> Iterator[RawRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values one after another: it is JSON lines
            yield from _read_jsonl(text, path.name, loaded)
            return
        raise UserError(f"{where}: {path.name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    records = _records_of(data)
    if records is None:
        keys = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise UserError(
            f"{where}: {path.name}: expected an array of records, an object holding one array of records "
            f"(e.g. {{\"data\": [...]}}), or an object of equal-length columns; found {keys}"
        )
    for i, rec in enumerate(records):
        origin = f"{path.name}:[{i}]"
        if not isinstance(rec, dict):
            loaded.dropped.append(Dropped(origin, "not_an_object", f"expected a JSON object, got {type(rec).__name__}",
                                          excerpt(rec)))
            continue
        yield RawRow(rec, origin)


def _records_of(data: Any) -> list[Any] | None:
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        return None
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    record_lists = [v for v in lists.values() if v and all(isinstance(r, dict) for r in v[:10])]
    if len(record_lists) == 1:
        return record_lists[0]
    if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
        cols = list(lists)  # column-oriented: {"prompt": [...], "completion": [...]}
        return [dict(zip(cols, vals, strict=True)) for vals in zip(*lists.values(), strict=True)]
    return None


def _read_csv(text: str, name: str, delimiter: str, loaded: Loaded) -> Iterator[RawRow]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    if not reader.fieldnames:
        return
    width = len(reader.fieldnames)
    start = 2
    for rec in reader:
        origin = f"{name}:{start}"
        start = reader.line_num + 1
        if None in rec or any(v is None for v in rec.values()):
            got = width + len(rec.get(None) or []) - sum(v is None for v in rec.values())
            loaded.dropped.append(Dropped(origin, "malformed_row", f"expected {width} fields, got {got}",
                                          excerpt({k: v for k, v in rec.items() if k is not None})))
            continue
        yield RawRow(dict(rec), origin)


def _read_parquet(path: Path, where: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
        raise UserError(f"{where}: {path.name} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield RawRow(rec, f"{path.name}:row {i}")


def _read_txt(text: str, name: str) -> Iterator[RawRow]:
    """Raw text: one document per block of lines separated by a blank line."""
    block: list[str] = []
    first = 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                first = lineno
            block.append(line)
        elif block:
            yield RawRow({"text": "\n".join(block)}, f"{name}:{first}")
            block = []
