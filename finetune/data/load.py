"""Read rows from local files (.jsonl .json .csv .tsv .parquet .txt) or a Hugging Face Hub dataset.

Every row keeps where it came from (``file.jsonl:17``) so a dropped row can be found again. JSON lines and CSV
are read here rather than through ``datasets`` because a bad line must be reported with its line number and the
rest of the file kept; Parquet goes through pyarrow (what ``datasets`` uses), the Hub through
``datasets.load_dataset``. Files are only read, never modified.
"""

from __future__ import annotations

import csv
import itertools
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


def check_local_file(path: Path, *, where: str) -> None:
    """What every local source must be before it is read: an existing file of a supported type."""
    if not path.exists():
        raise UserError(f"{where}: file not found: {path} (relative paths are resolved against the recipe's folder)")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUFFIXES)[:5]
        shown = f"; data files in it: {', '.join(inside)}" if inside else ""
        raise UserError(f"{where}: {path} is a folder, not a file; name one file ({', '.join(SUFFIXES)}){shown}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{where}: {path.name}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")


def read_local(path: Path, *, where: str, max_rows: int | None = None) -> Loaded:
    """Rows of one local file. ``where`` names the recipe key for error messages (data.sources[0].path)."""
    check_local_file(path, where=where)
    suffix = path.suffix.lower()
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
# Byte-order marks of the Unicode encodings that are not UTF-8 (Notepad's "Unicode" is UTF-16 LE).
BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"), (b"\xff\xfe", "UTF-16 LE"),
        (b"\xfe\xff", "UTF-16 BE"))


def other_unicode(data: bytes) -> str | None:
    """The encoding of text saved as UTF-16 or UTF-32 (by its byte-order mark, or without one by the NUL bytes
    between ASCII characters), or None."""
    for bom, name in BOMS:
        if data.startswith(bom):
            return name
    head = data[:4096]
    if len(head) >= 4:
        even, odd = head[0::2], head[1::2]
        # mostly ASCII text: every other byte is NUL, and the bytes between are not
        if odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "UTF-16 LE"
        if even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "UTF-16 BE"
    return None


def _read_text(path: Path, where: str) -> str:
    data = path.read_bytes()
    encoding = other_unicode(data)
    if encoding is not None:
        raise UserError(f"{where}: {path.name} is {encoding} text, not UTF-8; save it as UTF-8 (e.g. "
                        f"`iconv -f {encoding.replace(' ', '')} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}`, "
                        "or \"Save as\" UTF-8 in your editor) and point the recipe at that file.")
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
    row = _one_row(data)
    if row is not None:
        raise UserError(f"{where}: {path.name} holds a single JSON object, one row ({row}), not a list of rows; wrap "
                        "it in a list ([{...}, {...}]), or use .jsonl with one object per line")
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


# Columns that make an object one data row, by format (the column-oriented {"prompt": [...], "completion": [...]}
# holds lists of texts instead, and {"data": [...]} one list of rows).
ROW_FIELDS = (("messages",), ("conversations",), ("chosen", "rejected"), ("prompt", "completion"),
              ("instruction", "output"), ("text",))


def _one_row(data: Any) -> str | None:
    """What shows that a .json file's top-level object is one row rather than rows: its conversation (a list of
    turns under messages/conversations/chosen/...) or the text fields of a row format; None otherwise."""
    if not isinstance(data, dict):
        return None
    for key in ("messages", "conversations", "chosen", "rejected", "prompt", "completion"):
        value = data.get(key)
        if isinstance(value, list) and value and all(
                isinstance(t, dict) and ({"role", "content"} <= set(t) or {"from", "value"} <= set(t)) for t in value):
            return f"its {key!r} is a list of {len(value)} turns"
    for fields in ROW_FIELDS:
        if all(isinstance(data.get(f), str) for f in fields):
            return f"with {', '.join(repr(f) for f in fields)} as text"
    return None


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


# CSV delimiters worth detecting in a .csv or .tsv file (Excel writes ';' where ',' is the decimal mark).
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def sniff_delimiter(lines: list[str], default: str) -> str:
    """The delimiter that splits the header into several fields and the first rows into as many.

    The suffix's own delimiter wins a tie, so a real comma-separated file is never read otherwise."""
    sample = [line for line in lines[:50] if line.strip()]
    best, best_score = default, -1.0
    for delimiter in [default] + [d for d in DELIMITERS if d != default]:
        counts = [len(fields) for fields in csv.reader(sample, delimiter=delimiter)]
        if not counts or counts[0] < 2:
            continue
        score = sum(c == counts[0] for c in counts) / len(counts)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _ends_in_quotes(line: str, delimiter: str, quoted: bool) -> tuple[bool, bool, bool]:
    """Whether the line ends inside a quoted cell, whether that cell opened on this line, and whether a quoted
    cell closed here with text right after its closing quote (`"abc"def`: the quote was not meant to close it).

    Follows Python's csv reader: a quote opens a quoted cell only at the start of a cell; "" inside one is a
    literal quote; a quote anywhere else is literal text."""
    state = "quoted" if quoted else "start"
    opened = stray = False
    for ch in line.rstrip("\r\n"):
        if state == "start":
            state = "quoted" if ch == '"' else ("start" if ch == delimiter else "field")
            opened |= state == "quoted"
        elif state == "field":
            state = "start" if ch == delimiter else "field"
        elif state == "quoted":
            state = "quote" if ch == '"' else "quoted"
        else:  # just after a quote inside a quoted cell: "" is a literal quote, anything else closes the cell
            state = "quoted" if ch == '"' else ("start" if ch == delimiter else "field")
            stray |= state == "field"
            opened &= state == "quoted"
    return state == "quoted", opened and state == "quoted", stray


def _read_csv(text: str, name: str, delimiter: str, loaded: Loaded) -> Iterator[RawRow]:
    """Rows of a CSV/TSV file, each with the line it starts on.

    A cell whose opening quote is never closed (or is closed by a stray quote many lines later) would swallow
    the following lines into one row: that row is dropped as ``unclosed_quote`` naming the line where the quote
    opened, and reading goes on at the next line. Only rows that span several lines are examined that closely;
    the rest is Python's csv reader at full speed."""
    lines = text.splitlines(keepends=True)
    delimiter = sniff_delimiter(lines, delimiter)
    if delimiter != ("\t" if name.lower().endswith(".tsv") else ","):
        loaded.name = f"{name} ({DELIMITERS[delimiter]}-separated)"
    header: list[str] = []
    start = 0
    while start < len(lines):
        reader = csv.reader(itertools.islice(lines, start, None), delimiter=delimiter)
        read = 0  # lines of this reader consumed so far
        restart = len(lines)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. a cell over the csv module's size limit
                first, read = start + read, reader.line_num
                loaded.dropped.append(Dropped(f"{name}:{first + 1}", "malformed_row", f"not readable as CSV ({exc})",
                                              excerpt(lines[first].rstrip("\r\n"))))
                restart = start + read
                break
            first, last, read = start + read, start + reader.line_num - 1, reader.line_num
            if not fields:
                continue  # a blank line
            spill = _quote_trouble(lines[first: last + 1], delimiter) if last > first else None
            if not header:
                if spill is not None:
                    raise UserError(f"{name}: the header row opens a quote on line {first + spill + 1} that is not "
                                    "closed where the header ends; fix the header")
                header = fields
                continue
            if spill is None and last > first and len(fields) != len(header):
                spill = 0  # a quoted cell over several lines, and the row it makes has the wrong width
            if spill is not None:
                at = first + spill
                until = "is never closed" if last == len(lines) - 1 and _ends_open(lines[first: last + 1], delimiter) \
                    else f"runs on to line {last + 1}"
                loaded.dropped.append(Dropped(
                    f"{name}:{at + 1}", "unclosed_quote",
                    f'a quote (") opens a cell on line {at + 1} and {until}; this row was dropped and reading went '
                    f'on at line {at + 2}. Close the quote, or write a quote inside a quoted cell as ""',
                    excerpt(lines[at].rstrip("\r\n"))))
                restart = at + 1
                break
            origin = f"{name}:{first + 1}"
            if len(fields) != len(header):
                loaded.dropped.append(Dropped(origin, "malformed_row", f"expected {len(header)} fields, got {len(fields)}",
                                              excerpt(lines[first].rstrip("\r\n"))))
                continue
            yield RawRow(dict(zip(header, fields, strict=True)), origin)
        start = restart


def _quote_trouble(record_lines: list[str], delimiter: str) -> int | None:
    """For a row that spans several lines: the index of the line whose opening quote was never closed, or was
    closed by a quote followed by more text (`"abc"def`: a stray quote further down); None when it is a proper
    quoted cell over several lines."""
    quoted, spill = False, None
    for i, line in enumerate(record_lines):
        quoted, opened, stray = _ends_in_quotes(line, delimiter, quoted)
        if stray and spill is not None:
            return spill
        if opened and spill is None:
            spill = i
    return spill if quoted else None


def _ends_open(record_lines: list[str], delimiter: str) -> bool:
    quoted = False
    for line in record_lines:
        quoted = _ends_in_quotes(line, delimiter, quoted)[0]
    return quoted


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
