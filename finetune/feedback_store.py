"""The feedback store: conversations and ratings kept locally, in one SQLite file per served model.

``finetune serve`` (web page and API) and ``finetune chat`` record each exchange (the messages sent, the reply, how
it ended) and the user's feedback on a reply: thumbs up, thumbs down, or a better answer. Everything lives in one
SQLite file, ``feedback.sqlite3``, in the store folder: ``runs/<name>/serve/`` when serving a recipe's export, or a
folder next to the GGUF when serving a file. ``finetune feedback`` (finetune/feedback.py) turns it into training
data through finetune/data/feedback.py.
"""

from __future__ import annotations

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
FINISH_REASONS = (None, "stop", "length", "stopped", "cancelled")

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
    source TEXT,
    finish_reason TEXT            -- how the rated reply ended: stop | length (max_tokens) | stopped (by the user)
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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(feedback)")}
        if "finish_reason" not in columns:  # a store written before replies recorded how they ended
            self._db.execute("ALTER TABLE feedback ADD COLUMN finish_reason TEXT")

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
            row = self._db.execute("SELECT messages, reply, finish_reason FROM exchanges WHERE id=?",
                                   (completion_id,)).fetchone()
        return {"messages": json.loads(row[0]), "reply": row[1], "finish_reason": row[2]} if row else None

    def add_feedback(self, *, messages: list[dict[str, str]] | None = None, reply: str | None = None,
                     completion_id: str | None = None, rating: str | None = None, correction: str | None = None,
                     comment: str | None = None, finish_reason: str | None = None, source: str = "api") -> int:
        """Record feedback on one reply. The conversation comes from the request or from the logged exchange.

        finish_reason: how the reply ended ("stop", "length" = cut at max_tokens, "stopped" by the user); the
        server's own log wins over what the client says when it holds the same reply.
        """
        if rating not in (None, "up", "down"):
            raise ValueError(f"rating: expected 'up', 'down' or null, got {rating!r}")
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason: expected one of {', '.join(map(str, FINISH_REASONS))}, "
                             f"got {finish_reason!r}")
        correction = correction.strip() if isinstance(correction, str) else None
        if rating is None and not correction:
            raise ValueError("give a rating ('up' or 'down') or a correction (a better answer)")
        logged = self.exchange(completion_id) if completion_id else None
        if messages is None or reply is None:
            if logged is None:
                raise ValueError("send 'messages' and 'reply' (the completion id is not in this server's log)")
            messages = messages if messages is not None else logged["messages"]
            reply = reply if reply is not None else logged["reply"]
        messages = check_messages(messages)
        if not isinstance(reply, str):
            raise ValueError(f"reply: expected a string, got {type(reply).__name__}")
        if not messages or messages[-1]["role"] != "user":
            last = f"ends with role {messages[-1]['role']!r}" if messages else "is empty"
            raise ValueError(f"messages: the conversation before the rated reply {last}; it must end with the user "
                             "message the reply answers")
        if logged is not None and logged["reply"] == reply and logged["finish_reason"]:
            finish_reason = logged["finish_reason"]
        finish_reason = "stopped" if finish_reason == "cancelled" else finish_reason
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO feedback (created, completion_id, messages, reply, rating, correction, comment, source, "
                "finish_reason) VALUES (?,?,?,?,?,?,?,?,?)",
                (time.time(), completion_id, json.dumps(messages, ensure_ascii=False), reply, rating,
                 correction or None, comment, source, finish_reason),
            )
            return int(cur.lastrowid)

    def feedback(self) -> list[dict[str, Any]]:
        """All feedback rows, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, created, completion_id, messages, reply, rating, correction, comment, source, "
                "finish_reason FROM feedback ORDER BY id"
            ).fetchall()
        keys = ("id", "created", "completion_id", "messages", "reply", "rating", "correction", "comment", "source",
                "finish_reason")
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


def open_store(store_folder: Path) -> FeedbackStore:
    """The store in an existing folder; a folder without one is the user's mistake, named with the fix."""
    if not (Path(store_folder) / STORE_FILE).exists():
        raise UserError(
            f"no feedback store at {Path(store_folder) / STORE_FILE}. Feedback is recorded by `finetune serve` "
            "(web page thumbs up/down, POST /api/feedback) and `finetune chat` (/good, /bad, /better); "
            "give the recipe, the served .gguf, or the folder that holds feedback.sqlite3."
        )
    return FeedbackStore(store_folder)
