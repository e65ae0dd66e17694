"""The client of the llama.cpp worker process (finetune/gguf/worker.py): the one way the rest of finetune talks to
llama.cpp. ``finetune serve``'s pool sends requests and routes their events itself (``generate``, ``cancel``,
``recv``); ``finetune chat`` streams one reply at a time (``stream``); eval's GGUF column takes whole answers
(``answer``); ``finetune.gguf.runtime`` runs one-shot jobs (``run``). No caller builds or reads a pipe message.
The process is started by multiprocessing's spawn: a script that uses it needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from finetune.gguf.worker import NoChatTemplate, RequestError, WorkerCrashed, worker_main


class Worker:
    """One worker process (``options``: see ``worker_main``); ``start()`` blocks until the model is loaded."""

    def __init__(self, options: dict[str, Any], *, load_timeout: float = 300.0):
        self.options = options
        self.load_timeout = load_timeout
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.send_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _first_message(self, timeout: float | None, doing: str) -> tuple:
        """Spawn the process (spawn, not fork: a clean interpreter, no copied locks or threads from the parent) and
        wait for its first message."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_main, args=(child, self.options), daemon=True, name="finetune-llama-worker")
        proc.start()
        child.close()
        self.process, self.conn = proc, parent
        deadline = None if timeout is None else time.monotonic() + timeout
        while not parent.poll(0.2):  # a dead process closes the pipe: poll says so
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise WorkerCrashed(f"the llama.cpp worker did not finish {doing} within {timeout:.0f} s")
        try:
            return parent.recv()
        except (EOFError, OSError):
            proc.join(timeout=5)
            raise WorkerCrashed(f"the llama.cpp worker exited while {doing} (exit code {proc.exitcode})",
                                proc.exitcode) from None

    def start(self) -> dict[str, Any]:
        kind, payload = self._first_message(self.load_timeout, f"loading {self.options['gguf']}")
        if kind == "fatal":
            self.stop()
            raise (NoChatTemplate if payload["code"] == "no_chat_template" else WorkerCrashed)(payload["message"])
        self.info = payload
        return payload

    def run(self, timeout: float | None = None) -> dict[str, Any]:
        """The one-shot job: {"result": ...} or {"error": message}. A crash or timeout raises WorkerCrashed."""
        try:
            return self._first_message(timeout, f"{self.options['job']['op']} on {self.options['gguf']}")[1]
        finally:  # interrupted (Ctrl-C), the job stops with its caller
            self.stop()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        with self.send_lock:
            self.conn.send(msg)

    def recv(self) -> tuple:
        assert self.conn is not None
        return self.conn.recv()

    def generate(self, request: dict[str, Any]) -> str:
        """Send a generation request (its keys: see ``Generator.generate``); returns its id."""
        rid = request.get("id") or uuid.uuid4().hex
        self.send({**request, "op": "generate", "id": rid})
        return rid

    def cancel(self, rid: str) -> None:
        """Stop a request between two tokens; it still ends with its ("done", ...) or ("error", ...) event."""
        self.send({"op": "cancel", "id": rid})

    def stream(self, request: dict[str, Any], *, stall_s: float | None = None) -> Iterator[tuple[str, Any]]:
        """Run one request, blocking: its (kind, payload) events up to and including ("done", payload). A refusal
        raises RequestError; a crash restarts the worker and raises WorkerCrashed; no event for ``stall_s`` raises
        TimeoutError. Closing the iterator early cancels the generation and waits until the worker has stopped."""
        try:
            rid = self.generate(request)
        except OSError:  # the process died since the last request (killed while idle): a fresh one answers
            self.restart()
            rid = self.generate(request)
        finished = False
        try:
            while not finished:
                if stall_s is not None and not self.conn.poll(stall_s):
                    finished = True  # a hung worker acknowledges nothing: its owner stops it
                    raise TimeoutError(f"no reply from the llama.cpp worker in {stall_s:.0f} s")
                try:
                    kind, _, payload = self.recv()
                except (EOFError, OSError):
                    finished = True
                    self.restart()
                    raise WorkerCrashed("the model worker crashed during this reply (it was restarted)") from None
                finished = kind in ("done", "error")
                if kind == "error":
                    raise RequestError(payload["status"], payload["code"], payload["message"])
                yield kind, payload
        finally:
            if not finished:
                try:
                    self.cancel(rid)
                    while self.recv()[0] not in ("done", "error"):
                        pass
                except (EOFError, OSError):
                    self.restart()

    def answer(self, request: dict[str, Any], *, stall_s: float | None = None) -> dict[str, Any]:
        """Run one request to its end: the ("done", ...) payload (text, finish_reason, token counts, message)."""
        return next(payload for kind, payload in self.stream(request, stall_s=stall_s) if kind == "done")

    def stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        if self.process is not None:
            self.process.join(timeout=3)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=3)
        self.process, self.conn = None, None

    def restart(self) -> dict[str, Any]:
        self.stop()
        self.restarts += 1
        return self.start()
