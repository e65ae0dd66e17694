"""HTTP plumbing of the server: OpenAI-shaped errors, server-sent events, the ASGI guard in front of everything
(Host check, API key, body limit counted while reading, one log line per 4xx/5xx answer) and the wait that
cancels work when the client disconnects."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from serve.app import ServerSettings

log = logging.getLogger("finetune.serve")
DRAIN_OVERSIZE_S = 5.0  # how long an oversize upload is read (and thrown away) so the client can see the 413

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, code: str | None = None, *, param: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    kind = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, *, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param=param, type_=type_), status_code=status,
                        headers=headers)


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON or does not fit the schema: one 400 naming every problem."""
    problems = []
    for e in exc.errors():
        if e["type"] == "json_invalid":
            at = e["loc"][1] if len(e["loc"]) > 1 else "?"
            problems.append(f"the body is not valid JSON ({(e.get('ctx') or {}).get('error', 'parse error')} at "
                            f"character {at})")
            continue
        where = ".".join(str(p) for p in e["loc"][1:]) or "body"
        problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    first = exc.errors()[0]["loc"][1:] if exc.errors() and exc.errors()[0]["type"] != "json_invalid" else ()
    return error_response(400, f"invalid request: {'; '.join(problems)}", "invalid_request",
                          param=".".join(str(p) for p in first) or None)

async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 and 405 in OpenAI's error shape, naming what this server has."""
    if exc.status_code == 404:
        message = (f"{request.method} {request.url.path}: no such endpoint (this server has /v1/chat/completions, "
                   "/v1/completions, /v1/models, /api/feedback, /health and the page at /)")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code), headers=getattr(exc, "headers", None))


# ------------------------------------------------------------------------------------------ the guard (ASGI)
class Guard:
    """In front of everything: Host check, API key, the body limit (counted while reading), and one log line per
    4xx/5xx answer. Pure ASGI, so that the app sees the client's disconnect and the body is never held whole
    before it is measured."""

    def __init__(self, app: Any, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._logged(scope, send)
        settings = self.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if settings.allowed_hosts is not None:
            host = host_name(headers.get("host", "")).lower()
            if host not in settings.allowed_hosts:
                await reply(send, 400, f"Host header {headers.get('host', '')!r} is not accepted: this server listens "
                            f"on a loopback address and answers only {', '.join(settings.allowed_hosts)} (protection "
                            "against DNS rebinding); use one of those in the URL", "invalid_host")
                return
        path = scope["path"]
        if path.startswith(("/v1/", "/api/")) and settings.api_key and not key_ok(headers, settings.api_key):
            await reply(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                        "invalid_api_key")
            return
        limit = settings.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await drain(receive)  # never stored; read so that a client still sending sees the 413, not a broken pipe
            await reply(send, 413, f"request body of {length} bytes is over this server's limit of {limit} bytes",
                        "request_too_large")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away while uploading
            body += message.get("body", b"")
            if len(body) > limit:
                await drain(receive)
                await reply(send, 413, f"request body is over this server's limit of {limit} bytes (stopped reading "
                            f"at {len(body)} bytes)", "request_too_large")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: only the disconnect is left to hear

        try:
            await self.app(scope, replay, send)
        except Exception as exc:  # a bug: the 500 and its traceback come from the server; this is the one line
            log.error(f"500 {scope['method']} {path} internal error: {type(exc).__name__}: {exc}")
            raise

    def _logged(self, scope: dict[str, Any], send: Any) -> Any:
        state: dict[str, Any] = {"status": 0, "body": b""}

        async def logged_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and state["status"] >= 400:
                state["body"] = (state["body"] + message.get("body", b""))[:4096]
                if not message.get("more_body", False):
                    log_answer(scope, state["status"], state["body"])
            await send(message)

        return logged_send


def log_answer(scope: dict[str, Any], status: int, body: bytes) -> None:
    try:
        error = json.loads(body)["error"]
        what = f"{error.get('code') or error.get('type')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        what = body.decode("utf-8", errors="replace")[:300]
    (log.error if status >= 500 else log.warning)(f"{status} {scope['method']} {scope['path']} {what}")


async def drain(receive: Any) -> None:
    """Read and discard the rest of an oversize upload (bounded in time, constant memory): a client that is still
    sending when the server closes the connection would not see the 413."""
    deadline = time.monotonic() + DRAIN_OVERSIZE_S
    with suppress(asyncio.TimeoutError):
        while time.monotonic() < deadline:
            message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return


async def reply(send: Any, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def host_name(header: str) -> str:
    """The host of a Host header, without the port: '127.0.0.1:8765' -> '127.0.0.1', '[::1]:8765' -> '::1'."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def key_ok(headers: dict[str, str], key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(request: Request, awaitable: Any) -> Any:
    """Await ``awaitable``; if the client disconnects first, cancel it (which cancels a queued or running
    generation: see Pool.generate) and raise ClientGone."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled() and work.done():
        return work.result()
    with suppress(asyncio.CancelledError):
        await work
    raise ClientGone


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
