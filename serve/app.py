"""The HTTP side: an OpenAI-compatible API, a health endpoint, the feedback API and the web chat page.

Endpoints (``/v1/*`` and ``/api/*`` need ``Authorization: Bearer KEY`` when the server has an API key):
    GET  /                       the web chat page (serve/static/index.html; no external resources)
    GET  /health                 status, model, limits, workers (no key needed on loopback; on the network, without
                                 the key it says only {"status": "ok"})
    GET  /v1/models              the one model this server serves;  GET /v1/models/{id}  that model
    POST /v1/chat/completions    chat, rendered with the GGUF's own chat template; "stream": true -> SSE
    POST /v1/completions         raw text completion (no template)
    POST /api/feedback           {completion_id?, messages?, reply?, rating: up|down, correction?, finish_reason?}
    GET  /api/feedback           stored counts

Sampling: ``temperature`` defaults to 0.7 and ``top_p`` to 0.95 (OpenAI's defaults are 1.0 and 1.0): send them to
get OpenAI's. Implemented besides: ``stop`` (up to 4 non-empty strings), ``seed``, ``presence_penalty``,
``frequency_penalty``, ``logit_bias`` (token id -> bias), ``response_format`` (text, json_object, json_schema:
enforced with a llama.cpp grammar), ``echo`` (completions), ``user`` (accepted, no effect), and llama.cpp's
``top_k``, ``min_p``, ``repeat_penalty``, and ``tools`` with ``tool_choice`` auto or none: tools are rendered by the
model's chat template, and the reply's ``tool_calls`` (OpenAI's shape, ``finish_reason`` "tool_calls") are read for
the call syntaxes of ``finetune.data.toolcalls`` (Qwen2.5/3 Hermes, Qwen3.5 XML, Llama 3.1 JSON, Mistral); with
tools, a streamed reply comes whole in one delta. Reasoning (``<think>``, ``[THINK]``, gpt-oss's analysis channel)
is returned as ``reasoning_content`` apart from ``content``; streamed without tools, it comes as
``reasoning_content`` deltas before the answer's ``content`` deltas, never as raw markers. Anything else (``logprobs``, ``n`` > 1, ``suffix``...) is refused
with a 400 that names it, never silently ignored. ``model`` may be left out; any other name than the served one is
a 404 ``model_not_found``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` everywhere (404 and 405 too) so the
official clients raise the usual exceptions: 400 invalid request / prompt too long, 401 bad key, 404 unknown model or
path, 413 body too large (counted while reading, chunked uploads included), 429 too many requests in flight,
500 the worker crashed on this request (it is restarted), 503 no worker free in time. Every 4xx and 5xx answer is
logged as one console line (logger ``finetune.serve``).

A client that disconnects cancels its request, streaming or not, generating or still queued: the worker stops
between two tokens and takes the next request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.feedback_store import FeedbackStore
from serve.pool import Busy, Pool, RequestFailed, Unavailable

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("finetune.serve")
DRAIN_OVERSIZE_S = 5.0  # how long an oversize upload is read (and thrown away) so the client can see the 413


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 1536
    max_tokens: int = 512            # the most tokens one request may generate (larger asks are clamped)
    default_max_tokens: int = 256
    log_conversations: bool = True
    max_body_bytes: int = 1 << 20
    # Host headers accepted; None = any. On loopback only local names: a web page elsewhere cannot reach this
    # server through DNS rebinding (a hostile name that resolves to 127.0.0.1).
    allowed_hosts: list[str] | None = None
    # Listening on the network: /health tells a caller without the key only whether the server is up.
    network: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # shown by /health (gguf path, store, n_ctx...)


# ------------------------------------------------------------------------------------------- request bodies
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""
    tool_calls: list[dict[str, Any]] | None = None   # an assistant turn that called tools
    tool_call_id: str | None = None                  # a tool result: the call it answers
    name: str | None = None
    reasoning_content: str | None = None             # an earlier answer's reasoning, as this server returned it

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            other = sorted({str(p.get("type")) for p in value if p.get("type") != "text"})
            if other:
                raise ValueError(f"content parts of type {', '.join(other)} are not supported (text only)")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: text ones only (others are refused above)
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# Parameters that are accepted but change nothing in the answer.
NO_EFFECT = {"user"}
# Parameters that are understood but not implemented: refused when they ask for something (a value other than
# "off"), so a client never gets an answer that silently ignored what it asked for.
REFUSED_UNLESS_OFF: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False), "best_of": (None, 1), "suffix": (None, ""),
}
WHY_NOT = {
    "logprobs": "llama.cpp would have to keep the logits of every token",
    "top_logprobs": "llama.cpp would have to keep the logits of every token",
    "functions": "the legacy functions API; send tools instead",
    "function_call": "the legacy functions API; send tool_choice instead",
    "best_of": "one choice per request",
    "suffix": "no fill-in-the-middle",
}


class Sampling(BaseModel):
    # Unknown fields are kept (not dropped) so that unsupported() can name them in a 400.
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2, description="default 0.7 (OpenAI: 1.0)")
    top_p: float = Field(0.95, gt=0, le=1, description="default 0.95 (OpenAI: 1.0)")
    top_k: int = Field(40, ge=0, description="llama.cpp: 0 = off")
    min_p: float = Field(0.05, ge=0, le=1, description="llama.cpp: 0 = off")
    repeat_penalty: float = Field(1.0, gt=0, description="llama.cpp: 1 = off")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("an empty stop string would end every answer before it starts; leave it out")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (value or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"token {token}: bias {bias} is outside -100..100")
        return value

    def unsupported(self) -> list[str]:
        """Names of parameters this server would have to ignore to answer."""
        names = []
        for key, value in (self.model_extra or {}).items():
            if key in NO_EFFECT:
                continue
            if key in REFUSED_UNLESS_OFF and value in REFUSED_UNLESS_OFF[key]:
                continue
            names.append(key)
        return names


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    # "auto" (default with tools) or "none" (tools are not shown to the model); forcing a call ("required", a
    # named function) is refused: nothing here constrains the model to call.
    tool_choice: Literal["auto", "none"] | None = None
    # Not OpenAI: lets the web page and `finetune chat` mark their own conversations in the log.
    source: Literal["api", "web", "chat"] = "api"


class CompletionRequest(Sampling):
    prompt: str = Field(..., min_length=1, description="the text to continue (not empty)")
    echo: bool = False


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    completion_id: str | None = None
    messages: list[dict[str, Any]] | None = None
    reply: str | None = None
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=20000)
    comment: str | None = Field(None, max_length=2000)
    # How the rated reply ended: "stop", "length" (cut at max_tokens) or "stopped" (by the user).
    finish_reason: Literal["stop", "length", "stopped", "cancelled"] | None = None
    source: str = "web"


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def agent_messages(body: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The request's messages and tools as the chat template takes them (and as training rendered them): tool
    calls with parsed arguments, tool results, reasoning of earlier answers. Raises ValueError naming the field."""
    from finetune.data.formats import RowError, read_conversation

    raw = []
    for m in body.messages:
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        turn |= {k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                   ("name", m.name), ("reasoning_content", m.reasoning_content)) if v is not None}
        raw.append(turn)
    try:
        return read_conversation(raw, body.tools if body.tool_choice != "none" else None)
    except RowError as exc:
        raise ValueError(exc.detail) from None


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


# -------------------------------------------------------------------------------------------------- the app
def create_app(pool: Pool, settings: ServerSettings, store: FeedbackStore | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.attach(asyncio.get_running_loop())
        yield
        pool.close()

    app = FastAPI(title="finetune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, settings=settings)
    model_card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "finetune"}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path}: no such endpoint (this server has /v1/chat/completions, "
                       "/v1/completions, /v1/models, /api/feedback, /health and the page at /)")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code), headers=getattr(exc, "headers", None))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        status = pool.status()
        state = "ok" if all(w["alive"] for w in status["workers"]) else "degraded"
        headers = {k.lower(): v for k, v in request.headers.items()}
        if settings.network and settings.api_key and not key_ok(headers, settings.api_key):
            return {"status": state}
        return {"status": state, "model": settings.model_name,
                "auth": bool(settings.api_key), "max_prompt_tokens": settings.max_prompt_tokens,
                "max_tokens": settings.max_tokens, "feedback": store is not None, **settings.extra, **status}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return unknown_model(model_id) or model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        refused = check(body)
        if refused is not None:
            return refused
        try:
            messages, tools = agent_messages(body)
        except ValueError as exc:
            return error_response(400, str(exc), "invalid_request", param="messages" if "messages" in str(exc)
                                  else "tools")
        job = _job(body, mode="chat", messages=messages, tools=tools)
        if body.response_format is not None and body.response_format.type != "text":
            if body.response_format.type == "json_schema":
                schema = (body.response_format.json_schema or {}).get("schema")
                if not isinstance(schema, dict):
                    return error_response(400, "response_format.json_schema.schema: expected a JSON schema object",
                                          "invalid_request", param="response_format")
                job["json_schema"] = schema
            else:
                job["json_schema"] = {}  # any JSON object
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        def log_exchange(result: dict[str, Any]) -> None:
            if store is not None and settings.log_conversations and result["finish_reason"] != "cancelled":
                store.add_exchange(messages, result["text"], completion_id=cid, model=settings.model_name,
                                   finish_reason=result["finish_reason"], source=body.source,
                                   params={"temperature": body.temperature, "max_tokens": job["max_tokens"]})

        return await _respond(request, body, job, cid, chat=True, on_done=log_exchange)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        refused = check(body)
        if refused is not None:
            return refused
        job = _job(body, mode="completion", prompt=body.prompt)
        return await _respond(request, body, job, f"cmpl-{uuid.uuid4().hex}", chat=False, on_done=None,
                              echo=body.prompt if body.echo else "")

    @app.post("/api/feedback")
    async def feedback(body: FeedbackRequest):
        if store is None:
            return error_response(503, "this server was started without a feedback store", "no_store")
        try:
            fid = store.add_feedback(messages=body.messages, reply=body.reply, completion_id=body.completion_id,
                                     rating=body.rating, correction=body.correction, comment=body.comment,
                                     finish_reason=body.finish_reason, source=body.source)
        except ValueError as exc:
            return error_response(400, str(exc), "invalid_feedback")
        return {"id": fid, "stored": True}

    @app.get("/api/feedback")
    async def feedback_counts():
        if store is None:
            return error_response(503, "this server was started without a feedback store", "no_store")
        return {"store": str(store.path), **store.counts()}

    # ------------------------------------------------------------------------------------------- helpers
    def unknown_model(name: str | None) -> JSONResponse | None:
        if name is None or name == settings.model_name:
            return None
        return error_response(404, f"model {name!r} is not served here: this server serves {settings.model_name!r} "
                              "(GET /v1/models); send that name or leave 'model' out", "model_not_found",
                              param="model")

    def check(body: Sampling) -> JSONResponse | None:
        unknown = unknown_model(body.model)
        if unknown is not None:
            return unknown
        names = body.unsupported()
        if not names:
            return None
        reasons = [f"{n} ({WHY_NOT[n]})" if n in WHY_NOT else n for n in names]
        return error_response(400, f"unsupported parameter{'s' if len(names) > 1 else ''}: {', '.join(reasons)}. "
                              "This server implements temperature, top_p, max_tokens, stop, seed, presence_penalty, "
                              "frequency_penalty, logit_bias, response_format, stream and (llama.cpp) top_k, min_p, "
                              "repeat_penalty; leave the others out", "unsupported_parameter", param=names[0])

    def _job(body: Sampling, **what: Any) -> dict[str, Any]:
        asked = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        return {"max_tokens": min(asked, settings.max_tokens), "temperature": body.temperature, "top_p": body.top_p,
                "top_k": body.top_k, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "logit_bias": body.logit_bias, "stop": stop, "seed": body.seed,
                "max_prompt_tokens": settings.max_prompt_tokens, **what}

    async def _respond(request: Request, body: Sampling, job: dict[str, Any], cid: str, *, chat: bool, on_done,
                       echo: str = "") -> Response:
        created = int(time.time())
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
        prompt_tokens = first[2]["prompt_tokens"]

        def usage(done: dict[str, Any]) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done["completion_tokens"],
                    "total_tokens": prompt_tokens + done["completion_tokens"]}

        if not body.stream:
            if on_done:
                on_done(done)
            choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
            if chat:
                choice["message"] = done.get("message") or {"role": "assistant", "content": done["text"]}
            else:
                choice["text"] = echo + done["text"]
            return JSONResponse({"id": cid, "object": "chat.completion" if chat else "text_completion",
                                 "created": created, "model": settings.model_name, "choices": [choice],
                                 "usage": usage(done)})

        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = ({"role": "assistant", "content": ""} if role else {}) | (
                    {"content": delta} if delta else {})
            else:
                c["text"] = delta or ""
            return {"id": cid, "object": obj, "created": created, "model": settings.model_name, "choices": [c]}

        async def stream():
            try:
                if chat:
                    yield sse(chunk(None, None, role=True))
                if echo:
                    yield sse(chunk(echo, None))
                # With tools offered, the reply is held back until it is whole: a tool call is only known to be
                # one (and parsed) at the end. It then comes as one delta in OpenAI's shape.
                whole = chat and bool(job.get("tools"))
                async for event in events:
                    if event[0] == "delta" and not whole:
                        yield sse(chunk(event[2], None))
                    elif event[0] == "reasoning" and not whole:  # reasoning as it comes, apart from the answer
                        piece = chunk(None, None)
                        piece["choices"][0]["delta"] = {"reasoning_content": event[2]}
                        yield sse(piece)
                    elif event[0] == "done":
                        done = event[2]
                        if on_done:
                            on_done(done)
                        if whole:
                            message = done.get("message") or {"content": done["text"]}
                            delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                            if "tool_calls" in delta:
                                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(delta["tool_calls"])]
                            piece = chunk(None, None)
                            piece["choices"][0]["delta"] = delta
                            yield sse(piece)
                        yield sse(chunk(None, done["finish_reason"]))
                        if include_usage:
                            yield sse({"id": cid, "object": obj, "created": created, "model": settings.model_name,
                                       "choices": [], "usage": usage(done)})
                yield sse("[DONE]")
            except RequestFailed as exc:
                # Headers are already sent: report in-band, the way OpenAI streams report errors.
                (log.error if exc.status >= 500 else log.warning)(
                    f"{exc.status} POST {request.url.path} (streaming, in-band) {exc.code}: {exc.message}")
                yield sse(error_body(exc.status, exc.message, exc.code))
            finally:
                await events.aclose()  # a client that went away cancels the generation

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
