"""The HTTP side: an OpenAI-compatible API, a health endpoint, the feedback API and the web chat page.

Endpoints (``/v1/*`` and ``/api/*`` need ``Authorization: Bearer KEY`` when the server has an API key):
    GET  /                       the web chat page (serve/static/index.html; no external resources)
    GET  /health                 status, model, limits, workers (no key needed; reveals no conversation)
    GET  /v1/models              the one model this server serves
    POST /v1/chat/completions    chat, rendered with the GGUF's own chat template; "stream": true -> SSE
    POST /v1/completions         raw text completion (no template)
    POST /api/feedback           {completion_id?, messages?, reply?, rating: up|down, correction?}
    GET  /api/feedback           stored counts

Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}`` so the official clients raise the usual
exceptions: 400 invalid request / prompt too long, 401 bad key, 413 body too large, 429 too many requests in
flight, 500 the worker crashed on this request (it is restarted), 503 no worker free in time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from finetune.feedback import FeedbackStore
from serve.pool import Busy, Pool, RequestFailed, Unavailable

STATIC = Path(__file__).parent / "static"


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
    extra: dict[str, Any] = field(default_factory=dict)  # shown by /health (gguf path, store, n_ctx...)


# ------------------------------------------------------------------------------------------- request bodies
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many optional OpenAI fields; unknown ones are ignored
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    # Not OpenAI: lets the web page mark its own conversations in the log.
    source: Literal["api", "web", "chat"] = "api"


class CompletionRequest(Sampling):
    prompt: str


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    completion_id: str | None = None
    messages: list[dict[str, Any]] | None = None
    reply: str | None = None
    rating: Literal["up", "down"] | None = None
    correction: str | None = Field(None, max_length=20000)
    comment: str | None = Field(None, max_length=2000)
    source: str = "web"


def error_response(status: int, message: str, code: str | None = None, *, type_: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = type_ or {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error",
                     429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}},
                        status_code=status, headers=headers)


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


# -------------------------------------------------------------------------------------------------- the app
def create_app(pool: Pool, settings: ServerSettings, store: FeedbackStore | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.attach(asyncio.get_running_loop())
        yield
        pool.close()

    app = FastAPI(title="finetune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if settings.allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith(("/v1/", "/api/")):
            if settings.api_key and not _key_ok(request, settings.api_key):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      "invalid_api_key")
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_body_bytes:
                return error_response(413, f"request body of {length} bytes is over this server's limit of "
                                           f"{settings.max_body_bytes}", "request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {problems}", "invalid_request")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        status = pool.status()
        ok = all(w["alive"] for w in status["workers"])
        return {"status": "ok" if ok else "degraded", "model": settings.model_name,
                "auth": bool(settings.api_key), "max_prompt_tokens": settings.max_prompt_tokens,
                "max_tokens": settings.max_tokens, "feedback": store is not None, **settings.extra, **status}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "finetune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        job = _job(body, mode="chat", messages=messages)
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        def log(result: dict[str, Any]) -> None:
            if store is not None and settings.log_conversations and result["finish_reason"] != "cancelled":
                store.add_exchange(messages, result["text"], completion_id=cid, model=settings.model_name,
                                   finish_reason=result["finish_reason"], source=body.source,
                                   params={"temperature": body.temperature, "max_tokens": job["max_tokens"]})

        return await _respond(body, job, cid, chat=True, on_done=log)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        job = _job(body, mode="completion", prompt=body.prompt)
        return await _respond(body, job, f"cmpl-{uuid.uuid4().hex}", chat=False, on_done=None)

    @app.post("/api/feedback")
    async def feedback(body: FeedbackRequest):
        if store is None:
            return error_response(503, "this server was started without a feedback store", "no_store")
        try:
            fid = store.add_feedback(messages=body.messages, reply=body.reply, completion_id=body.completion_id,
                                     rating=body.rating, correction=body.correction, comment=body.comment,
                                     source=body.source)
        except ValueError as exc:
            return error_response(400, str(exc), "invalid_feedback")
        return {"id": fid, "stored": True}

    @app.get("/api/feedback")
    async def feedback_counts():
        if store is None:
            return error_response(503, "this server was started without a feedback store", "no_store")
        return {"store": str(store.path), **store.counts()}

    # ------------------------------------------------------------------------------------------- helpers
    def _job(body: Sampling, **what: Any) -> dict[str, Any]:
        asked = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        return {"max_tokens": min(asked, settings.max_tokens), "temperature": body.temperature, "top_p": body.top_p,
                "stop": stop, "seed": body.seed, "max_prompt_tokens": settings.max_prompt_tokens, **what}

    async def _respond(body: Sampling, job: dict[str, Any], cid: str, *, chat: bool, on_done) -> Response:
        created = int(time.time())
        events = pool.generate(job)
        try:
            first = await events.__anext__()  # "start": the prompt was accepted (or an exception says why not)
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
            try:
                async for event in events:
                    if event[0] == "done":
                        done = event[2]
            except RequestFailed as exc:
                return error_response(exc.status, exc.message, exc.code)
            if on_done:
                on_done(done)
            choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": done["text"]}
            else:
                choice["text"] = done["text"]
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
                async for event in events:
                    if event[0] == "delta":
                        yield sse(chunk(event[2], None))
                    elif event[0] == "done":
                        done = event[2]
                        if on_done:
                            on_done(done)
                        yield sse(chunk(None, done["finish_reason"]))
                        if include_usage:
                            yield sse({"id": cid, "object": obj, "created": created, "model": settings.model_name,
                                       "choices": [], "usage": usage(done)})
                yield sse("[DONE]")
            except RequestFailed as exc:
                # Headers are already sent: report in-band, the way OpenAI streams report errors.
                yield sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
            finally:
                await events.aclose()  # a client that went away cancels the generation

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _key_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
