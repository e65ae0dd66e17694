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
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune.feedback_store import FeedbackStore
from serve.http import Guard, error_response, http_error, invalid_request, key_ok
from serve.pool import Pool
from serve.respond import respond
from serve.schemas import WHY_NOT, ChatRequest, CompletionRequest, FeedbackRequest, Sampling, agent_messages

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
    # Listening on the network: /health tells a caller without the key only whether the server is up.
    network: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # shown by /health (gguf path, store, n_ctx...)


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

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)

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
        return unknown_model(settings, model_id) or model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        refused = check(settings, body)
        if refused is not None:
            return refused
        try:
            messages, tools = agent_messages(body)
        except ValueError as exc:
            return error_response(400, str(exc), "invalid_request", param="messages" if "messages" in str(exc)
                                  else "tools")
        job = job_for(settings, body, mode="chat", messages=messages, tools=tools)
        refused = constrain_output(job, body.response_format)
        if refused is not None:
            return refused
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        def log_exchange(result: dict[str, Any]) -> None:
            if store is not None and settings.log_conversations and result["finish_reason"] != "cancelled":
                store.add_exchange(messages, result["text"], completion_id=cid, model=settings.model_name,
                                   finish_reason=result["finish_reason"], source=body.source,
                                   params={"temperature": body.temperature, "max_tokens": job["max_tokens"]})

        return await respond(pool, settings.model_name, request, body, job, cid, chat=True, on_done=log_exchange)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        refused = check(settings, body)
        if refused is not None:
            return refused
        job = job_for(settings, body, mode="completion", prompt=body.prompt)
        return await respond(pool, settings.model_name, request, body, job, f"cmpl-{uuid.uuid4().hex}", chat=False,
                             on_done=None, echo=body.prompt if body.echo else "")

    add_feedback_routes(app, store)
    return app


def constrain_output(job: dict[str, Any], response_format) -> JSONResponse | None:
    """``response_format`` as the job's JSON constraint (json_schema: that schema; json_object: any JSON object);
    the 400 when its schema is not an object."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type != "json_schema":
        job["json_schema"] = {}  # any JSON object
        return None
    schema = (response_format.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        return error_response(400, "response_format.json_schema.schema: expected a JSON schema object",
                              "invalid_request", param="response_format")
    job["json_schema"] = schema
    return None


def add_feedback_routes(app: FastAPI, store: FeedbackStore | None) -> None:
    """POST /api/feedback stores a rating or correction; GET /api/feedback counts them (503 without a store)."""

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


def unknown_model(settings: ServerSettings, name: str | None) -> JSONResponse | None:
    """None when ``name`` is the served model (or absent), else the 404 that names it."""
    if name is None or name == settings.model_name:
        return None
    return error_response(404, f"model {name!r} is not served here: this server serves {settings.model_name!r} "
                          "(GET /v1/models); send that name or leave 'model' out", "model_not_found",
                          param="model")

def check(settings: ServerSettings, body: Sampling) -> JSONResponse | None:
    """The answer that refuses a request (unknown model, a parameter not implemented), or None."""
    unknown = unknown_model(settings, body.model)
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

def job_for(settings: ServerSettings, body: Sampling, **what: Any) -> dict[str, Any]:
    """The pool's job for a request: its sampling settings, max_tokens clamped to the server's limit."""
    asked = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return {"max_tokens": min(asked, settings.max_tokens), "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "logit_bias": body.logit_bias, "stop": stop, "seed": body.seed,
            "max_prompt_tokens": settings.max_prompt_tokens, **what}
