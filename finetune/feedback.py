"""The feedback loop: conversations and ratings stored locally, exported as training data for the next round.

``finetune serve`` (web page and API) and ``finetune chat`` record each exchange (the messages sent, the reply)
and the user's feedback on a reply: thumbs up, thumbs down, or a better answer. Everything lives in one SQLite
file, ``feedback.sqlite3``, in the store folder: ``runs/<name>/serve/`` when serving a recipe's export, or a
folder next to the GGUF when serving a file.

``finetune feedback export RECIPE|DIR -o out.jsonl`` writes the approved replies (thumbs up) and the corrected
ones (the suggested better answer replaces the model's) as ``{"messages": [...]}`` rows, the format ``prepare``
reads: add the file as a data source and train again. The latest feedback on a reply wins; a reply rated down
without a correction is left out (it says what not to say, not what to say).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from finetune.errors import UserError

STORE_FILE = "feedback.sqlite3"
ROLES = ("system", "user", "assistant")

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id TEXT PRIMARY KEY,          -- the completion id the client saw (chatcmpl-...)
    created REAL NOT NULL,
    model TEXT,
    messages TEXT NOT NULL,       -- JSON list of {role, content}: the conversation sent
    reply TEXT NOT NULL,          -- the model's answer
    finish_reason TEXT,
    params TEXT,                  -- JSON: temperature, max_tokens, ...
    source TEXT                   -- "api", "web", "chat"
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    completion_id TEXT,           -- links to exchanges.id when known
    messages TEXT NOT NULL,       -- JSON: the conversation up to (not including) the rated reply
    reply TEXT NOT NULL,          -- the reply that was rated
    rating TEXT,                  -- "up" | "down" | NULL (a correction without a rating)
    correction TEXT,              -- the user's better answer, if any
    comment TEXT,
    source TEXT
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback(completion_id);
"""


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Validate a conversation: a list of {role, content} with known roles and string content."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: expected a list of {{role, content}} objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: expected {{role: system|user|assistant, content: str}}, got {m!r:.120}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class FeedbackStore:
    """One SQLite file; safe to use from the server's threads (one connection, one lock)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STORE_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (export) never block the server's writes
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_exchange(self, messages: list[dict[str, str]], reply: str, *, completion_id: str | None = None,
                     model: str | None = None, finish_reason: str | None = None,
                     params: dict[str, Any] | None = None, source: str = "api") -> str:
        cid = completion_id or f"chatcmpl-{uuid.uuid4().hex}"
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO exchanges VALUES (?,?,?,?,?,?,?,?)",
                (cid, time.time(), model, json.dumps(messages, ensure_ascii=False), reply, finish_reason,
                 json.dumps(params or {}), source),
            )
        return cid

    def exchange(self, completion_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT messages, reply FROM exchanges WHERE id=?", (completion_id,)).fetchone()
        return {"messages": json.loads(row[0]), "reply": row[1]} if row else None

    def add_feedback(self, *, messages: list[dict[str, str]] | None = None, reply: str | None = None,
                     completion_id: str | None = None, rating: str | None = None, correction: str | None = None,
                     comment: str | None = None, source: str = "api") -> int:
        """Record feedback on one reply. The conversation comes from the request or from the logged exchange."""
        if rating not in (None, "up", "down"):
            raise ValueError(f"rating: expected 'up', 'down' or null, got {rating!r}")
        correction = correction.strip() if isinstance(correction, str) else None
        if rating is None and not correction:
            raise ValueError("give a rating ('up' or 'down') or a correction (a better answer)")
        if messages is None or reply is None:
            logged = self.exchange(completion_id) if completion_id else None
            if logged is None:
                raise ValueError("send 'messages' and 'reply' (the completion id is not in this server's log)")
            messages = messages if messages is not None else logged["messages"]
            reply = reply if reply is not None else logged["reply"]
        messages = check_messages(messages)
        if not isinstance(reply, str):
            raise ValueError(f"reply: expected a string, got {type(reply).__name__}")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO feedback (created, completion_id, messages, reply, rating, correction, comment, source) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (time.time(), completion_id, json.dumps(messages, ensure_ascii=False), reply, rating,
                 correction or None, comment, source),
            )
            return int(cur.lastrowid)

    def feedback(self) -> list[dict[str, Any]]:
        """All feedback rows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created, completion_id, messages, reply, rating, correction, comment, source "
                "FROM feedback ORDER BY id"
            ).fetchall()
        keys = ("id", "created", "completion_id", "messages", "reply", "rating", "correction", "comment", "source")
        out = []
        for row in rows:
            item = dict(zip(keys, row, strict=True))
            item["messages"] = json.loads(item["messages"])
            out.append(item)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            exchanges = self._db.execute("SELECT COUNT(*) FROM exchanges").fetchone()[0]
            fb = dict(self._db.execute("SELECT COALESCE(rating, 'none'), COUNT(*) FROM feedback GROUP BY 1").fetchall())
            corrections = self._db.execute(
                "SELECT COUNT(*) FROM feedback WHERE correction IS NOT NULL AND correction != ''").fetchone()[0]
        return {"exchanges": exchanges, "up": fb.get("up", 0), "down": fb.get("down", 0), "corrections": corrections}


def training_rows(feedback: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Approved and corrected replies as {"messages": [...]} rows (latest feedback per reply wins)."""
    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:  # oldest first, so later feedback on the same reply replaces earlier
        key = item["completion_id"] or f"row-{item['id']}"
        latest[key] = item
    rows, seen = [], set()
    stats = {"approved": 0, "corrected": 0, "rejected": 0, "duplicates": 0}
    for item in latest.values():
        if item["correction"]:
            answer, kind = item["correction"], "corrected"
        elif item["rating"] == "up":
            answer, kind = item["reply"], "approved"
        else:
            stats["rejected"] += 1
            continue
        messages = item["messages"] + [{"role": "assistant", "content": answer}]
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        stats[kind] += 1
        rows.append({"messages": messages})
    return rows, stats


def store_dir_for(target: str | Path, overrides: list[str] | None = None) -> Path:
    """The store folder for a recipe (runs/<name>/serve), a GGUF file, a store folder or a feedback.sqlite3 file."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml"):
        from finetune import recipe as recipe_mod

        return recipe_mod.load(path, overrides).run_dir("serve")
    if path.suffix == ".gguf":
        return gguf_store_dir(path)
    if path.name == STORE_FILE:
        return path.parent
    if path.is_dir() and not (path / STORE_FILE).exists() and (path / "serve" / STORE_FILE).exists():
        return path / "serve"  # a run folder runs/<name>
    return path


def gguf_store_dir(gguf: Path) -> Path:
    """Feedback for a served GGUF file lives next to it: <folder>/<stem>.feedback/.

    Not inside an installed package (the embedded model's GGUF) or a read-only folder: there it goes to
    ~/.cache/finetune/feedback/<stem>/ instead.
    """
    import os

    folder = gguf.resolve().parent
    installed = {"site-packages", "dist-packages"} & set(folder.parts)
    if os.access(folder, os.W_OK) and not installed:
        return folder / f"{gguf.stem}.feedback"
    from finetune.models import cache_root

    return cache_root() / "feedback" / gguf.stem


def export(store_folder: Path, out: Path) -> dict[str, Any]:
    from finetune.runs import atomic_write_text

    if not (Path(store_folder) / STORE_FILE).exists():
        raise UserError(
            f"no feedback store at {Path(store_folder) / STORE_FILE}. Feedback is recorded by `finetune serve` "
            "(web page thumbs up/down, POST /api/feedback) and `finetune chat` (/good, /bad, /better); "
            "give the recipe, the served .gguf, or the folder that holds feedback.sqlite3."
        )
    store = FeedbackStore(store_folder)
    try:
        rows, stats = training_rows(store.feedback())
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"rows": len(rows), "out": str(out), **stats}


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="finetune feedback",
        description="Turn feedback collected by `finetune serve` / `finetune chat` into training data.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("export", help="write approved and corrected replies as {messages: [...]} JSONL rows")
    stats = sub.add_parser("stats", help="count stored exchanges, ratings and corrections")
    for sp in (exp, stats):
        sp.add_argument("target", metavar="RECIPE|DIR|MODEL.gguf",
                        help="the recipe (reads runs/<name>/serve/), the served .gguf, or the store folder")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. runs_dir=/tmp/runs")
        sp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    exp.add_argument("-o", "--out", required=True, help="output JSONL file (add it to data.sources to train on it)")
    ns, extra = p.parse_known_args(argv)  # overrides may come after -o
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    folder = store_dir_for(ns.target, ns.overrides + extra)
    if ns.action == "stats":
        if not (folder / STORE_FILE).exists():
            raise UserError(f"no feedback store at {folder / STORE_FILE}")
        store = FeedbackStore(folder)
        counts = store.counts()
        store.close()
        print(f"{folder / STORE_FILE}: {counts['exchanges']} exchanges, {counts['up']} thumbs up, "
              f"{counts['down']} thumbs down, {counts['corrections']} better answers")
        return 0
    result = export(folder, Path(ns.out))
    print(f"wrote {result['rows']} conversations to {result['out']} ({result['approved']} approved, "
          f"{result['corrected']} corrected; left out {result['rejected']} rated down without a better answer, "
          f"{result['duplicates']} duplicates)")
    print(f"train on them: add `- path: {Path(ns.out).resolve()}` under data.sources in your recipe, then "
          "`finetune run RECIPE`")
    return 0
