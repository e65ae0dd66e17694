"""One answer of the OpenAI-compatible API: a job run on the worker pool, returned whole or streamed as server-sent
events (chat.completion / text_completion objects, usage, tool calls, reasoning deltas, in-band errors)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.http import ClientGone, error_body, error_response, log, sse, unless_disconnected
from serve.pool import Busy, Pool, RequestFailed, Unavailable
from serve.schemas import Sampling


async def respond(pool: Pool, model_name: str, request: Request, body: Sampling, job: dict[str, Any], cid: str, *,
                  chat: bool, on_done: Callable[[dict[str, Any]], None] | None, echo: str = "") -> Response:
    """Run ``job`` on the pool and answer in OpenAI's shape: one JSON object, or (``body.stream``) server-sent
    events, deltas as they come. The pool's refusals become 429/503/4xx answers; a client that disconnects
    cancels the generation. ``on_done`` sees the finished result (the server logs the exchange with it)."""
    events = pool.generate(job)

    async def first_event() -> tuple:
        return await events.__anext__()  # "start": the prompt was accepted (or an exception says why not)

    async def all_events() -> tuple[tuple, dict[str, Any]]:
        first = await first_event()
        done: dict[str, Any] = {}
        async for event in events:
            if event[0] == "done":
                done = event[2]
        return first, done

    try:
        if body.stream:
            first = await unless_disconnected(request, first_event())
        else:
            first, done = await unless_disconnected(request, all_events())
    except ClientGone:
        # Nobody reads this answer (the connection is gone); it makes the one log line.
        return error_response(499, "the client disconnected before the answer was ready; its generation was "
                              "cancelled", "client_disconnected")
    except Busy as exc:
        return error_response(429, f"server busy: {exc}; retry shortly", "too_many_requests",
                              headers={"Retry-After": "1"})
    except Unavailable as exc:
        return error_response(503, str(exc), "unavailable", headers={"Retry-After": "5"})
    except RequestFailed as exc:
        return error_response(exc.status, exc.message, exc.code)
    shape = Shape(cid, model_name, chat=chat, prompt_tokens=first[2]["prompt_tokens"])
    if not body.stream:
        if on_done:
            on_done(done)
        return JSONResponse(shape.whole(done, echo))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # With tools offered, the reply is held back until it is whole: a tool call is only known to be one (and
    # parsed) at the end. It then comes as one delta in OpenAI's shape.
    held = chat and bool(job.get("tools"))
    return StreamingResponse(stream(events, shape, on_done, echo=echo, held=held, include_usage=include_usage,
                                    path=request.url.path),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                      "X-Accel-Buffering": "no"})


async def stream(events: Any, shape: Shape, on_done: Callable[[dict[str, Any]], None] | None, *, echo: str,
                 held: bool, include_usage: bool, path: str) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer: the role, the echoed prompt, deltas (reasoning apart) or, when
    ``held``, the whole reply as one delta; the finish reason, the usage if asked, [DONE]."""
    try:
        if shape.chat:
            yield sse(shape.chunk(None, None, role=True))
        if echo:
            yield sse(shape.chunk(echo, None))
        async for event in events:
            if event[0] == "delta" and not held:
                yield sse(shape.chunk(event[2], None))
            elif event[0] == "reasoning" and not held:  # reasoning as it comes, apart from the answer
                yield sse(shape.chunk(None, None, delta={"reasoning_content": event[2]}))
            elif event[0] == "done":
                done = event[2]
                if on_done:
                    on_done(done)
                if held:
                    message = done.get("message") or {"content": done["text"]}
                    delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                    if "tool_calls" in delta:
                        delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(delta["tool_calls"])]
                    yield sse(shape.chunk(None, None, delta=delta))
                yield sse(shape.chunk(None, done["finish_reason"]))
                if include_usage:
                    yield sse(shape.usage_chunk(done))
        yield sse("[DONE]")
    except RequestFailed as exc:
        # Headers are already sent: report in-band, the way OpenAI streams report errors.
        (log.error if exc.status >= 500 else log.warning)(
            f"{exc.status} POST {path} (streaming, in-band) {exc.code}: {exc.message}")
        yield sse(error_body(exc.status, exc.message, exc.code))
    finally:
        await events.aclose()  # a client that went away cancels the generation


class Shape:
    """The OpenAI objects of one answer: chat.completion / text_completion, their chunks, and the usage."""

    def __init__(self, cid: str, model_name: str, *, chat: bool, prompt_tokens: int):
        self.cid, self.model_name, self.chat, self.prompt_tokens = cid, model_name, chat, prompt_tokens
        self.created = int(time.time())

    def usage(self, done: dict[str, Any]) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done["completion_tokens"],
                "total_tokens": self.prompt_tokens + done["completion_tokens"]}

    def whole(self, done: dict[str, Any], echo: str = "") -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
        if self.chat:
            choice["message"] = done.get("message") or {"role": "assistant", "content": done["text"]}
        else:
            choice["text"] = echo + done["text"]
        return {"id": self.cid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice], "usage": self.usage(done)}

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False,
              delta: dict[str, Any] | None = None) -> dict[str, Any]:
        """One streamed chunk: ``text`` as content (the role first when ``role``), or ``delta`` as given."""
        c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            c["delta"] = delta if delta is not None else (
                ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {}))
        else:
            c["text"] = text or ""
        return {"id": self.cid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [c]}

    def usage_chunk(self, done: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.cid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [], "usage": self.usage(done)}
