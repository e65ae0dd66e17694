"""The server's request bodies (OpenAI's chat and completion requests, the feedback request) and how a chat
request's messages become the conversation the chat template renders. Which parameters are implemented, accepted
without effect, or refused, and why: ``NO_EFFECT``, ``REFUSED_UNLESS_OFF``, ``WHY_NOT``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


def agent_messages(body: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The request's messages and tools as the chat template takes them (and as training rendered them): tool
    calls with parsed arguments, tool results, reasoning of earlier answers. Raises ValueError naming the field."""
    from finetune.data.conversation import RowError, read_conversation

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
