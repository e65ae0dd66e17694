"""Admission, queueing and crash recovery in front of the llama.cpp worker processes.

- At most ``max_concurrent`` requests are admitted at once (generating or waiting for a worker); the next one is
  answered 429 straight away, so a client knows to back off instead of hanging.
- Admitted requests wait in a FIFO for a free worker (each worker generates one request at a time; llama.cpp's
  context is not shareable). Waiting longer than ``queue_timeout`` -> 503.
- A worker that dies (segfault, abort, OOM kill) or stalls fails only the request it was running (500 for that
  request), and is restarted by its reader thread; the queue keeps flowing through the other workers meanwhile.
- A client that disconnects cancels its request: a queued one leaves the queue, a running one stops between two
  tokens, so an abandoned request never holds a worker (the app cancels the ``generate`` iterator, see
  serve/app.py ``unless_disconnected``).
- Each worker crash, stall and failed restart is logged as one console line (logger ``finetune.serve``).

Every worker has an epoch that changes on each restart; a worker handle is returned to the free queue together with
the epoch it had, and a stale entry (the worker was restarted meanwhile) is dropped. So a worker is never handed to
two requests at once, whatever the order of crash, restart and release.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from finetune.gguf.client import Worker
from finetune.gguf.worker import RequestError

log = logging.getLogger("finetune.serve")
STALL_TIMEOUT_S = 300.0  # no token for this long: the worker is considered hung and is restarted


class Busy(Exception):
    """Too many requests in flight (-> HTTP 429)."""


class Unavailable(Exception):
    """No worker became free in time, or the model could not be (re)loaded (-> HTTP 503)."""


RequestFailed = RequestError  # the worker refused or failed the request: HTTP status, error code and message


class Pool:
    def __init__(self, options: dict[str, Any], *, workers: int = 1, max_concurrent: int = 8,
                 queue_timeout: float = 600.0):
        self.options = options
        self.workers = [Worker(options) for _ in range(workers)]
        self.max_concurrent = max_concurrent
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.epochs: dict[int, int] = {}
        self.healthy: dict[int, bool] = {}
        self.current: dict[int, str | None] = {}
        self.jobs: dict[str, asyncio.Queue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.free: asyncio.Queue | None = None
        self.info: dict[str, Any] = {}
        self.closing = False

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> dict[str, Any]:
        """Load the model in every worker (blocking; call before the event loop serves requests)."""
        for w in self.workers:
            self.info = w.start()
        return self.info

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the started workers to the event loop: free queue + one reader thread per worker."""
        self.loop = loop
        self.free = asyncio.Queue()
        for i in range(len(self.workers)):
            self.epochs[i], self.healthy[i], self.current[i] = 0, True, None
            self.free.put_nowait((i, 0))
            threading.Thread(target=self._reader, args=(i,), daemon=True, name=f"llama-reader-{i}").start()

    def close(self) -> None:
        self.closing = True
        for w in self.workers:
            w.stop()

    def status(self) -> dict[str, Any]:
        return {
            # alive: running and not being recovered (a dying process can still look alive for a moment)
            "workers": [{"pid": w.pid, "alive": w.alive() and self.healthy.get(i, True), "restarts": w.restarts,
                         "busy": self.current.get(i) is not None} for i, w in enumerate(self.workers)],
            "in_flight": self.in_flight, "max_concurrent": self.max_concurrent,
            "served": self.served, "failed": self.failed,
            **({"last_error": self.info["last_error"]} if self.info.get("last_error") else {}),
        }

    # ----------------------------------------------------------------------------------------- reader thread
    def _reader(self, index: int) -> None:
        """Route a worker's events to the request that owns them; on a crash, fail that request and restart."""
        while not self.closing:
            worker = self.workers[index]
            try:
                event = worker.recv()
            except (EOFError, OSError, AttributeError, AssertionError):
                if self.closing:
                    return
                self._recover(index, f"the model worker (pid {worker.pid}) crashed "
                                     f"(exit code {worker.process.exitcode if worker.process else '?'})")
                continue
            queue = self.jobs.get(event[1]) if len(event) > 1 else None
            if queue is not None and self.loop is not None:
                self.loop.call_soon_threadsafe(queue.put_nowait, event)

    def _recover(self, index: int, reason: str) -> None:
        self.healthy[index] = False
        rid = self.current.get(index)
        log.error(f"{reason}{' while answering a request' if rid else ''}; restarting it")
        if rid and rid in self.jobs and self.loop is not None:
            self.loop.call_soon_threadsafe(
                self.jobs[rid].put_nowait,
                ("error", rid, {"status": 500, "code": "worker_crashed",
                                "message": f"{reason} while answering this request; it was restarted, try again"}),
            )
        self.current[index] = None
        delay = 1.0
        while not self.closing:
            try:
                self.workers[index].restart()
                break
            except Exception as exc:  # e.g. the GGUF was deleted or replaced: keep trying, health shows "degraded"
                if self.info.get("last_error") != str(exc):
                    log.error(f"model worker {index} could not be restarted (retrying): {exc}")
                self.info["last_error"] = str(exc)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.info.pop("last_error", None)
        self.epochs[index] += 1
        self.healthy[index] = True
        if self.loop is not None and self.free is not None:
            self.loop.call_soon_threadsafe(self.free.put_nowait, (index, self.epochs[index]))

    def kill_worker(self, index: int) -> None:
        """Kill a hung worker; its reader thread sees the pipe close and recovers."""
        proc = self.workers[index].process
        if proc is not None and proc.is_alive():
            proc.kill()

    # -------------------------------------------------------------------------------------------- requests
    async def _take(self) -> int:
        assert self.free is not None
        deadline = time.monotonic() + self.queue_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"no model worker became free within {self.queue_timeout:.0f} s; try again later")
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as the
            # item does, and a cancelled (abandoned) request would then take the worker anyway.
            try:
                async with asyncio.timeout(remaining):
                    index, epoch = await self.free.get()
            except TimeoutError:
                continue
            if epoch == self.epochs[index] and self.healthy[index]:
                return index
            # a stale entry from before a restart: the restarted worker is queued again under its new epoch

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[tuple]:
        """Admit, queue and run one request; yields ("start", ...), ("delta", ...)*, then ("done", ...).

        Raises Busy, Unavailable or RequestFailed (before or instead of "start"; a crash after "start" arrives
        as RequestFailed too). Closing the iterator early cancels the generation.
        """
        if self.in_flight >= self.max_concurrent:
            raise Busy(f"{self.in_flight} requests are in flight and this server takes at most {self.max_concurrent}")
        self.in_flight += 1
        rid = request.setdefault("id", uuid.uuid4().hex)
        index: int | None = None
        finished = False
        queue: asyncio.Queue = asyncio.Queue()
        try:
            index = await self._take()
            epoch = self.epochs[index]
            self.jobs[rid] = queue
            self.current[index] = rid
            try:
                self.workers[index].generate(request)
            except (OSError, AssertionError, AttributeError):
                pass  # the pipe is gone: the reader thread reports the crash into our queue
            while True:
                try:
                    async with asyncio.timeout(STALL_TIMEOUT_S):
                        event = await queue.get()
                except TimeoutError:
                    log.error(f"model worker {index} produced nothing for {STALL_TIMEOUT_S:.0f} s; killing it")
                    self.kill_worker(index)
                    raise RequestFailed(503, "worker_stalled",
                                        f"the model produced nothing for {STALL_TIMEOUT_S:.0f} s; it was restarted") from None
                kind = event[0]
                if kind == "error":
                    finished = True
                    err = event[2]
                    raise RequestFailed(err["status"], err["code"], err["message"])
                if kind == "done":
                    finished = True
                    self.served += 1
                    yield event
                    return
                yield event
        except (RequestFailed, Unavailable):
            self.failed += 1
            raise
        finally:
            if index is not None and not finished and self.current.get(index) == rid and self.healthy[index]:
                # The client went away mid-generation: cancel, and hand the worker back once it has stopped.
                try:
                    self.workers[index].cancel(rid)
                except (OSError, AssertionError, AttributeError):
                    pass
                asyncio.get_running_loop().create_task(self._drain(index, epoch, rid, queue))
            else:
                self._release(index, epoch if index is not None else 0, rid)

    async def _drain(self, index: int, epoch: int, rid: str, queue: asyncio.Queue) -> None:
        try:
            while True:
                event = await asyncio.wait_for(queue.get(), STALL_TIMEOUT_S)
                if event[0] in ("done", "error"):
                    break
        except asyncio.TimeoutError:
            self.kill_worker(index)
        finally:
            self._release(index, epoch, rid)

    def _release(self, index: int | None, epoch: int, rid: str) -> None:
        self.jobs.pop(rid, None)
        self.in_flight -= 1
        if index is None:
            return
        if self.current.get(index) == rid:
            self.current[index] = None
        if epoch == self.epochs[index] and self.healthy[index] and self.free is not None:
            self.free.put_nowait((index, epoch))
