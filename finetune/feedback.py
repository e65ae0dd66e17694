"""The feedback loop: conversations and ratings stored locally, exported as training data for the next round.

``finetune serve`` (web page and API) and ``finetune chat`` record each exchange (the messages sent, the reply, how
it ended) and the user's feedback on a reply: thumbs up, thumbs down, or a better answer. Everything lives in one
SQLite file, ``feedback.sqlite3``, in the store folder: ``runs/<name>/serve/`` when serving a recipe's export, or a
folder next to the GGUF when serving a file.

``finetune feedback export RECIPE|DIR -o out.jsonl`` writes the approved replies (thumbs up) and the corrected
ones (the suggested better answer replaces the model's) as ``{"messages": [...]}`` rows, the format ``prepare``
reads: add the file as a data source and train again. The latest feedback on a reply wins. Only approved and
corrected replies may receive loss, so the export leaves out, and says why:
- a reply rated down without a correction (it says what not to say, not what to say);
- a reply rated up that was cut at max_tokens or stopped by the user (an unfinished answer is not a good one);
- a conversation whose earlier model replies are not approved themselves, when the data will be trained with
  ``data.train_on: assistant`` or ``all`` (those earlier replies would be trained on too); with ``last_assistant``
  or ``completion`` they are context only and the row is kept;
- a row that ``prepare`` would drop (no user turn, an empty turn, a context that does not end with the user...).

``--as preferences`` writes preference data instead: DPO/ORPO pairs ``{"prompt", "chosen", "rejected"}`` from
corrections (the better answer chosen over the model's reply) to the output file, and KTO rows ``{"prompt",
"completion", "label"}`` to ``<out>.kto.jsonl``: a reply rated Good is desirable, one rated Bad undesirable, and a
correction gives both (its answer desirable, the replaced reply undesirable). A rejected or undesirable reply is
only ever pushed down: prepare trains preference rows on the final reply alone, and SFT on rated rows takes the
desirable ones only. Unfinished replies rated Good (cut or stopped) are left out; rated Bad, they are undesirable.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.errors import UserError

STORE_FILE = "feedback.sqlite3"
ROLES = ("system", "user", "assistant")
TRAIN_ON_CHOICES = ("assistant", "all", "last_assistant", "completion")  # prepare's data.train_on
FINISH_REASONS = (None, "stop", "length", "stopped", "cancelled")
UNFINISHED = {"length": "cut_at_max_tokens", "stopped": "stopped_by_user"}
# train_on settings under which every assistant turn of a row gets loss (not only the last one)
TRAINS_EVERY_TURN = ("assistant", "all")
LEFT_OUT = {
    "rated_bad": "rated Bad without a better answer",
    "cut_at_max_tokens": "rated Good but cut at max_tokens (give a better answer to keep it)",
    "stopped_by_user": "rated Good but stopped by the user (give a better answer to keep it)",
    "unapproved_context": "earlier model replies in the conversation are not approved and train_on {train_on} would "
                          "train them too (export with --train-on last_assistant and set data.train_on: "
                          "last_assistant, or rate those replies)",
    "duplicate": "the same conversation and answer twice",
    "unrated": "neither rated nor corrected",
    "identical_pair": "corrected to the same answer (nothing to prefer)",
}

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


def training_rows(feedback: list[dict[str, Any]], *, train_on: str = "assistant"
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Approved and corrected replies as {"messages": [...]} rows (latest feedback per reply wins).

    train_on: how the rows will be trained (prepare's data.train_on). Returns the rows and
    {"approved": n, "corrected": n, "left_out": {reason: n}} (reasons: LEFT_OUT keys and prepare's drop reasons).
    """
    from finetune.data.clean import clean_example
    from finetune.data.formats import RowError

    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:  # oldest first, so later feedback on the same reply replaces earlier
        key = item["completion_id"] or f"row-{item['id']}"
        latest[key] = item

    def approved(item: dict[str, Any]) -> str | None:
        """The answer this feedback approves (the reply or its correction), or None."""
        if item["correction"]:
            return item["correction"]
        if item["rating"] == "up" and item.get("finish_reason") not in UNFINISHED:
            return item["reply"]
        return None

    # Replies approved as they stand, by (conversation before them, text): an earlier model turn inside a later
    # conversation may be trained only if it is one of these.
    good_turns = {_turn_key(item["messages"], item["reply"]) for item in latest.values()
                  if approved(item) == item["reply"]}
    rows, seen = [], set()
    stats: dict[str, Any] = {"approved": 0, "corrected": 0, "left_out": Counter()}
    for item in latest.values():
        answer = approved(item)
        if answer is None:
            reason = "rated_bad" if item["rating"] == "down" or item["rating"] is None else \
                UNFINISHED[item["finish_reason"]]
            stats["left_out"][reason] += 1
            continue
        context = item["messages"]
        earlier = [i for i, m in enumerate(context) if m["role"] == "assistant"]
        if train_on in TRAINS_EVERY_TURN and any(
                _turn_key(context[:i], context[i]["content"]) not in good_turns for i in earlier):
            stats["left_out"]["unapproved_context"] += 1
            continue
        messages = context + [{"role": "assistant", "content": answer}]
        try:  # the row must be one prepare keeps: the same checks, with prepare's default cleaning
            clean_example({"messages": messages}, unicode=True, whitespace=True, require_assistant_last=True,
                          system_prompt=None)
            if not context or context[-1]["role"] != "user":
                raise RowError("context_not_ending_with_user", "the reply does not answer a user message")
        except RowError as exc:
            stats["left_out"][exc.reason] += 1
            continue
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key in seen:
            stats["left_out"]["duplicate"] += 1
            continue
        seen.add(key)
        stats["corrected" if item["correction"] else "approved"] += 1
        rows.append({"messages": messages})
    stats["left_out"] = dict(stats["left_out"])
    return rows, stats


def preference_rows(feedback: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                              dict[str, Any]]:
    """(DPO pairs from corrections, KTO rows from ratings and corrections, stats); latest feedback per reply wins."""
    from finetune.data.clean import clean_example
    from finetune.data.formats import RowError

    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:
        latest[item["completion_id"] or f"row-{item['id']}"] = item
    pairs: list[dict[str, Any]] = []
    rated: list[dict[str, Any]] = []
    seen: set[str] = set()
    stats: dict[str, Any] = {"pairs": 0, "desirable": 0, "undesirable": 0, "left_out": Counter()}

    def usable(context: list[dict[str, str]], answer: str) -> str | None:
        """prepare's reason to drop context + answer, or None."""
        try:
            clean_example({"messages": context + [{"role": "assistant", "content": answer}]}, unicode=True,
                          whitespace=True, require_assistant_last=True, system_prompt=None)
            if not context or context[-1]["role"] != "user":
                raise RowError("context_not_ending_with_user", "the reply does not answer a user message")
        except RowError as exc:
            return exc.reason
        return None

    def add_rated(context, answer: str, good: bool) -> None:
        key = json.dumps([context, answer, good], sort_keys=True, ensure_ascii=False)
        if key in seen:
            stats["left_out"]["duplicate"] += 1
            return
        seen.add(key)
        rated.append({"prompt": context, "completion": [{"role": "assistant", "content": answer}], "label": good})
        stats["desirable" if good else "undesirable"] += 1

    for item in latest.values():
        context, reply, correction = item["messages"], item["reply"], item["correction"]
        if correction:
            why = usable(context, correction) or usable(context, reply)
            if why is None and " ".join(correction.split()) == " ".join(reply.split()):
                why = "identical_pair"
            if why is not None:
                stats["left_out"][why] += 1
                continue
            pairs.append({"prompt": context, "chosen": [{"role": "assistant", "content": correction}],
                          "rejected": [{"role": "assistant", "content": reply}]})
            stats["pairs"] += 1
            add_rated(context, correction, True)
            add_rated(context, reply, False)
            continue
        if item["rating"] == "up" and item.get("finish_reason") in UNFINISHED:
            stats["left_out"][UNFINISHED[item["finish_reason"]]] += 1
            continue
        if item["rating"] not in ("up", "down"):
            stats["left_out"]["unrated"] += 1
            continue
        why = usable(context, reply)
        if why is not None:
            stats["left_out"][why] += 1
            continue
        add_rated(context, reply, item["rating"] == "up")
    stats["left_out"] = dict(stats["left_out"])
    return pairs, rated, stats


def kto_path(out: Path) -> Path:
    """Where --as preferences writes the KTO rows beside the pairs file: <out stem>.kto.jsonl."""
    return out.with_name(out.stem + ".kto.jsonl")


def export_preferences(store_folder: Path, out: Path) -> dict[str, Any]:
    from finetune.runs import atomic_write_text

    store = _open_store(store_folder)
    try:
        pairs, rated, stats = preference_rows(store.feedback())
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    atomic_write_text(kto_path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rated))
    return {"out": str(out), "kto_out": str(kto_path(out)), **stats}


def _turn_key(context: list[dict[str, str]], reply: str) -> str:
    return json.dumps([context, reply], sort_keys=True, ensure_ascii=False)


def left_out_text(left_out: dict[str, int], train_on: str) -> str:
    """'2 rated Bad without a better answer; 1 ...' (prepare's drop reasons as they are)."""
    if not left_out:
        return "nothing left out"
    return "; ".join(f"{n} {LEFT_OUT.get(reason, reason.replace('_', ' ')).format(train_on=train_on)}"
                     for reason, n in sorted(left_out.items(), key=lambda kv: -kv[1]))


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


def _open_store(store_folder: Path) -> FeedbackStore:
    if not (Path(store_folder) / STORE_FILE).exists():
        raise UserError(
            f"no feedback store at {Path(store_folder) / STORE_FILE}. Feedback is recorded by `finetune serve` "
            "(web page thumbs up/down, POST /api/feedback) and `finetune chat` (/good, /bad, /better); "
            "give the recipe, the served .gguf, or the folder that holds feedback.sqlite3."
        )
    return FeedbackStore(store_folder)


def export(store_folder: Path, out: Path, *, train_on: str = "assistant") -> dict[str, Any]:
    from finetune.runs import atomic_write_text

    store = _open_store(store_folder)
    try:
        rows, stats = training_rows(store.feedback(), train_on=train_on)
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
    exp.add_argument("--train-on", choices=TRAIN_ON_CHOICES,
                     help="the data.train_on of the recipe that will train the file (default: the recipe's when a "
                     "recipe is given, else assistant). With assistant or all, conversations whose earlier model "
                     "replies are not approved are left out, since those replies would be trained on too")
    exp.add_argument("--as", dest="kind", choices=("sft", "preferences"), default="sft",
                     help="sft (default): approved and corrected replies as {messages} rows; preferences: DPO/ORPO "
                     "pairs from corrections to -o, KTO rows from ratings and corrections to <out>.kto.jsonl "
                     "(train them with train.objective dpo/orpo or kto)")
    ns, extra = p.parse_known_args(argv)  # overrides may come after -o
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides = ns.overrides + extra
    recipe_train_on = None
    if Path(ns.target).suffix in (".yaml", ".yml"):
        from finetune import recipe as recipe_mod

        recipe = recipe_mod.load(Path(ns.target), overrides)
        folder, recipe_train_on = recipe.run_dir("serve"), recipe.data.train_on
    else:
        folder = store_dir_for(ns.target, overrides)
    if ns.action == "stats":
        if not (folder / STORE_FILE).exists():
            raise UserError(f"no feedback store at {folder / STORE_FILE}")
        store = FeedbackStore(folder)
        counts = store.counts()
        store.close()
        print(f"{folder / STORE_FILE}: {counts['exchanges']} exchanges, {counts['up']} thumbs up, "
              f"{counts['down']} thumbs down, {counts['corrections']} better answers")
        return 0
    out = Path(ns.out)
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name, e.g. -o {out / 'feedback.jsonl'}")
    if out.suffix != ".jsonl":
        raise UserError(f"-o {out}: the export writes JSON Lines; name the file *.jsonl (e.g. -o {out.with_suffix('.jsonl')})"
                        " so that prepare reads it as such")
    if ns.kind == "preferences":
        if ns.train_on:
            raise UserError("--train-on applies to --as sft; preference rows always train the final reply only")
        res = export_preferences(folder, out)
        left = sum(res["left_out"].values())
        print(f"wrote {res['pairs']} pairs (corrections) to {res['out']} and {res['desirable'] + res['undesirable']} "
              f"rated rows ({res['desirable']} desirable, {res['undesirable']} undesirable) to {res['kto_out']}")
        print(f"left out {left}: {left_out_text(res['left_out'], 'last_assistant')}" if left else "left out nothing")
        print(f"train on them: add `- path: {out.resolve()}` under data.sources and set train.objective: dpo (or "
              f"orpo); or `- path: {Path(res['kto_out']).resolve()}` with train.objective: kto")
        return 0
    train_on = ns.train_on or recipe_train_on or "assistant"
    result = export(folder, out, train_on=train_on)
    left = sum(result["left_out"].values())
    print(f"wrote {result['rows']} conversations to {result['out']} ({result['approved']} approved, "
          f"{result['corrected']} corrected; only approved or corrected replies get loss with data.train_on: {train_on})")
    print(f"left out {left}: {left_out_text(result['left_out'], train_on)}" if left else "left out nothing")
    print(f"train on them: add `- path: {out.resolve()}` under data.sources in your recipe, then "
          "`finetune run RECIPE`")
    return 0
