"""The llama.cpp worker process, the one llama.cpp layer of finetune: the one place a ``llama_cpp.Llama`` is made
(``load_llama``), the one generation loop (``Generator``) and the pipe protocol its client speaks
(``finetune.gguf.client.Worker``, what serve, chat, eval and ``finetune.gguf.runtime`` use). Why a child process:
llama.cpp is native code; a segfault, an abort or an out-of-memory kill inside it takes down one worker (the server
answers that request with an error and starts a fresh one; a one-shot job reports it as one line), not the caller.

The protocol over a ``multiprocessing`` pipe is plain tuples (picklable, no llama objects cross the boundary):

    parent -> child   {"op": "generate", "id": ..., "mode": "chat"|"completion", ...}   {"op": "cancel", "id": ...}
    child -> parent   ("ready", info) | ("fatal", {"code", "message"})                   once, at start
                      ("result", {"result": ...} | {"error": str})     a one-shot job (options["job"]), then it exits
                      ("start", id, {"prompt_tokens": n})                               prompt accepted
                      ("delta", id, text)                                               streamed text
                      ("reasoning", id, text)           streamed reasoning (chat without tools), never in a delta
                      ("done", id, {"finish_reason", "prompt_tokens", "completion_tokens", "text",
                                    "message"})  chat: OpenAI's assistant message (reasoning_content, tool_calls)
                      ("error", id, {"status": int, "code": str, "message": str})       request refused/failed

Chat prompts are rendered with the GGUF's own Jinja chat template (metadata ``tokenizer.chat_template``) through
llama-cpp-python's ``Jinja2ChatFormatter``; a GGUF without one is refused with a clear message instead of the
silent ``llama-2`` fallback llama-cpp-python would use. ``chat_template`` (a .jinja file) overrides it explicitly.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from finetune import hardware
from finetune.data.toolcalls import ReplyStream, parse_reply, tool_syntax
from finetune.errors import UserError


class NoChatTemplate(UserError):
    """The GGUF carries no ``tokenizer.chat_template`` and no template file was given."""


class WorkerCrashed(UserError):
    """The worker process died or stalled; ``exitcode`` is the process's (None when it was still running)."""

    def __init__(self, message: str, exitcode: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode


class RequestError(UserError):
    """The worker refused or failed one request: the HTTP status, an error code and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def no_template_message(gguf: str | Path) -> str:
    return (
        f"{gguf} has no chat template (GGUF metadata 'tokenizer.chat_template' is missing), so chat requests "
        "cannot be formatted the way the model was trained. Re-export it with `finetune export RECIPE` "
        "(which writes the tokenizer's template into the GGUF), or pass the model's template explicitly "
        "with --chat-template FILE.jinja (serve.chat_template in the recipe)."
    )


# ------------------------------------------------------------------------------------------ in the child
def llama_threads(threads: int | None = None, *, sharing: int = 1) -> int:
    """Threads of one llama.cpp process: the user's setting when given, else its share of the cores when ``sharing``
    processes run at once, at most LLAMA_CPP_MAX_THREADS (decoding is memory-bound: more stop paying)."""
    return hardware.threads(threads, sharing=sharing, cap=hardware.LLAMA_CPP_MAX_THREADS)


def load_llama(path: str, *, n_ctx: int = 512, threads: int | None = None, sharing: int = 1, logits_all: bool = False,
               vocab_only: bool = False, lora_path: str | None = None, seed: int = 0):
    """The one place a ``llama_cpp.Llama`` is made (in the child process only)."""
    import llama_cpp

    threads = llama_threads(threads, sharing=sharing)
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                           vocab_only=vocab_only, lora_path=lora_path, seed=seed, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


class Generator:
    """llama.cpp generation for one model; used inside the worker process (and by tests directly)."""

    def __init__(self, gguf: str, *, n_ctx: int, threads: int | None, chat_template: str | None = None,
                 lora_path: str | None = None, seed: int = 0, reasoning: str = "auto", sharing: int = 1):
        from finetune.gguf.chat_format import ChatRenderer

        self.gguf = gguf
        self.llm = load_llama(gguf, n_ctx=n_ctx, threads=threads, sharing=sharing, lora_path=lora_path, seed=seed)
        self.n_ctx = self.llm.n_ctx()
        # the renderer parity and eval use: same template variables, BOS/EOS texts and end-of-generation tokens
        self.renderer = ChatRenderer(self.llm, template=chat_template, reasoning=reasoning)
        self.stop_ids = frozenset(self.renderer.stop_ids)
        self.eos_text, self.bos_text = self.renderer.eos_text, self.renderer.bos_text
        self.template = self.renderer.template
        self.template_source = "file" if chat_template is not None else ("gguf" if self.template else None)
        self.formatter = self.renderer.formatter
        self.reasoning = reasoning

    def info(self) -> dict[str, Any]:
        return {"gguf": self.gguf, "n_ctx": self.n_ctx, "chat_template": self.template_source,
                "template": self.template, "eos": self.eos_text, "bos": self.bos_text, "pid": os.getpid()}

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[str]]:
        """(prompt text, stop strings) from the model's own chat template, rendered as in training: tools as the
        template's ``tools``, reasoning in the field the template reads, the recipe's thinking switch."""
        if self.formatter is None:
            raise NoChatTemplate(no_template_message(self.gguf))
        return self.renderer.render(messages, tools=tools)

    @staticmethod
    def json_grammar(schema: dict[str, Any]) -> Any:
        """A llama.cpp grammar that only lets JSON through: any object for {}, else the given JSON schema."""
        import json

        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        if not schema:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)

    def tokenize_prompt(self, prompt: str, *, chat: bool) -> list[int]:
        # A chat template writes its own BOS (if the model wants one): adding another would double it, which is
        # what llama-cpp-python's own Jinja2 handler avoids too. A raw completion prompt gets the model's default.
        if chat:
            return self.renderer.tokenize(prompt)
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def prepare(self, request: dict[str, Any]) -> tuple[str, list[int], list[str], int, Any]:
        """(prompt, its tokens, stop strings, max new tokens, grammar) of a generation request; RequestError when the
        request cannot be answered as asked."""
        chat = request["mode"] == "chat"
        if chat and request.get("tools") and tool_syntax(self.template) is None:
            raise RequestError(400, "tools_unsupported", "tools: this model's chat template has no tool-call format "
                               "finetune can read (Qwen2.5/Qwen3 <tool_call>, Qwen3.5 XML, Llama 3.1 JSON, Mistral "
                               "[TOOL_CALLS]); serve a model whose template has one, or pass one with "
                               "--chat-template FILE.jinja (the model must be trained with it)")
        try:
            prompt, stops = self.render_chat(request["messages"], request.get("tools")) if chat else (request["prompt"], [])
        except NoChatTemplate as exc:
            raise RequestError(400, "no_chat_template", str(exc)) from None
        except Exception as exc:  # a template that raises (e.g. "roles must alternate") is the client's error
            raise RequestError(400, "invalid_messages", f"the model's chat template rejected the messages: {exc}") from None
        tokens = self.tokenize_prompt(prompt, chat=chat)
        limit = request.get("max_prompt_tokens") or self.n_ctx
        if len(tokens) > limit:
            raise RequestError(400, "context_length_exceeded", f"the prompt has {len(tokens)} tokens; this server "
                               f"accepts at most {limit}. Shorten the conversation (start a new chat) or the prompt.")
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise RequestError(400, "context_length_exceeded",
                               f"the prompt ({len(tokens)} tokens) fills the context ({self.n_ctx})")
        vocab = self.llm.n_vocab()
        outside = [t for t in request.get("logit_bias") or {} if not 0 <= int(t) < vocab]
        if outside:
            raise RequestError(400, "invalid_logit_bias", f"logit_bias: token id {outside[0]} is not in this model's "
                               f"vocabulary (ids 0..{vocab - 1})")
        try:
            grammar = self.json_grammar(request["json_schema"]) if request.get("json_schema") is not None else None
        except Exception as exc:  # llama.cpp's schema converter or grammar parser refused it
            raise RequestError(400, "invalid_json_schema",
                               f"response_format: llama.cpp cannot enforce this JSON schema: {exc}") from None
        stop = list(dict.fromkeys(stops + list(request.get("stop") or [])))
        return prompt, tokens, stop, min(int(request.get("max_tokens") or 256), room), grammar

    def generate(self, request: dict[str, Any], emit: Callable[[tuple], None],
                 cancelled: Callable[[], bool]) -> None:
        rid = request["id"]
        chat = request["mode"] == "chat"
        try:
            prompt, tokens, stop, max_tokens, grammar = self.prepare(request)
        except RequestError as exc:
            emit(("error", rid, {"status": exc.status, "code": exc.code, "message": exc.message}))
            return
        emit(("start", rid, {"prompt_tokens": len(tokens)}))
        # Chat replies keep their special tokens (gpt-oss's channels, Mistral's [TOOL_CALLS], Llama's
        # <|python_tag|>): they are what the reply is read back by. Without tools, reasoning streams apart.
        reading = ReplyStream(self.template, prompt) if chat and not request.get("tools") else None
        pieces: list[str] = []
        finish_reason = "length"
        completion_tokens = 0
        steps = self.sample(tokens, request, max_tokens=max_tokens, stop=stop, grammar=grammar, special=chat)
        for piece, finish_reason, completion_tokens in steps:  # noqa: B007 (the last values are the result)
            if piece:
                pieces.append(piece)
                for field, text in reading.feed(piece) if reading else [("content", piece)]:
                    emit(("delta" if field == "content" else "reasoning", rid, text))
            if cancelled():
                finish_reason = "cancelled"
                break
        for field, text in reading.finish() if reading else []:
            emit(("delta" if field == "content" else "reasoning", rid, text))
        text = "".join(pieces)
        done: dict[str, Any] = {"finish_reason": finish_reason, "prompt_tokens": len(tokens),
                                "completion_tokens": completion_tokens, "text": text}
        if chat:
            done["message"] = self.reply_message(text, request.get("tools"), prompt=prompt)
            if done["message"].get("tool_calls") and finish_reason == "stop":
                done["finish_reason"] = "tool_calls"
        emit(("done", rid, done))

    def sample(self, tokens: list[int], request: dict[str, Any], *, max_tokens: int, stop: list[str], grammar: Any,
               special: bool) -> Iterator[tuple[str, str, int]]:
        """Generate after ``tokens``: yields (new text, finish reason so far, completion tokens) per token.

        llama.cpp's own completion loop drops special tokens from the text; this one detokenizes with
        ``special`` (chat replies keep their markers). It stops on an end-of-generation token (not part of the
        text), on a stop string (cut before it; text that may begin one is held back until it cannot), or after
        ``max_tokens``."""
        import numpy as np

        seed = request.get("seed")
        self.llm.set_seed(int(seed) if seed is not None else random.randrange(2**32))
        bias = {int(k): float(v) for k, v in (request.get("logit_bias") or {}).items()}

        def add_bias(_ids: Any, scores: Any) -> Any:
            scores = np.copy(scores)
            for token, value in bias.items():
                scores[token] += value
            return scores

        import llama_cpp

        generated: list[int] = []
        sent = 0
        text = ""
        for token in self.llm.generate(
                tokens, top_k=int(request.get("top_k", 40)), top_p=float(request.get("top_p", 0.95)),
                min_p=float(request.get("min_p", 0.05)), temp=float(request.get("temperature", 0.7)),
                repeat_penalty=float(request.get("repeat_penalty", 1.0)),
                presence_penalty=float(request.get("presence_penalty", 0.0)),
                frequency_penalty=float(request.get("frequency_penalty", 0.0)),
                logits_processor=llama_cpp.LogitsProcessorList([add_bias]) if bias else None, grammar=grammar):
            if token in self.stop_ids:
                yield text[sent:], "stop", len(generated)
                return
            generated.append(token)
            # the whole reply decoded again: a character split across tokens is complete only later
            text = self.llm.detokenize(generated, prev_tokens=tokens, special=special).decode("utf-8", errors="ignore")
            cut = min((at for at in (text.find(s, max(0, sent - len(s))) for s in stop) if at >= 0), default=-1)
            if cut >= 0:
                yield text[sent:cut], "stop", len(generated)
                return
            if len(generated) >= max_tokens:
                yield text[sent:], "length", len(generated)
                return
            held = max((k for s in stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
            yield text[sent:len(text) - held], "length", len(generated)
            sent = len(text) - held

    def reply_message(self, text: str, tools: list[dict[str, Any]] | None, *, prompt: str = "") -> dict[str, Any]:
        """The answer as OpenAI's assistant message: reasoning apart from content, and tool calls (only when the
        request offered tools and the template's call syntax is one finetune reads). ``prompt``: a generation
        prompt that opened the reasoning block (Qwen3.5) makes the reply start inside it, closed or not."""
        # without tools offered, no call syntax is read, except gpt-oss's channels, which hold its answer
        syntax = tool_syntax(self.template)
        opened = ReplyStream(self.template, prompt).opened
        reply = parse_reply(opened + text, self.template if tools or syntax == "harmony" else "", tools=tools,
                            end_tokens=(self.eos_text,) if self.eos_text else ())
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None:
            message["reasoning_content"] = reply.reasoning
        if tools and reply.tool_calls:
            message["tool_calls"] = reply.openai_tool_calls()
            message["content"] = reply.content or None
        elif tools and reply.unparsed is not None:  # a call the model wrote wrongly stays visible as text
            message["content"] = text
        return message


def worker_main(conn: Connection, options: dict[str, Any]) -> None:
    """Entry point of the child process: load the model (``options``: gguf, n_ctx, threads or its ``sharing`` of the
    cores, chat_template, lora_path, reasoning), then serve requests from the pipe until it closes; or, with ``job``,
    run that one finetune.gguf.runtime job, send its result and exit. ``env``: variables set before llama.cpp loads;
    ``stderr``: a file for its log."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides what stops (a reply or everything)
    # and tells the worker through the pipe, so the worker ignores SIGINT instead of dying mid-reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for key, value in (options.get("env") or {}).items():  # before llama.cpp (and its OpenMP) is loaded
        os.environ.setdefault(key, value)
    if options.get("stderr"):  # llama.cpp's own log, read back by the parent when the process dies
        os.dup2(os.open(options["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    if "job" in options:
        from finetune.gguf import runtime

        conn.send(("result", runtime.run_job({**options["job"], "gguf": options["gguf"]})))
        return
    try:
        gen = Generator(options["gguf"], n_ctx=options["n_ctx"], threads=options.get("threads"),
                        chat_template=options.get("chat_template"), lora_path=options.get("lora_path"),
                        reasoning=options.get("reasoning", "auto"), sharing=options.get("sharing", 1))
    except Exception as exc:
        conn.send(("fatal", {"code": "load_failed",
                             "message": f"could not load {options['gguf']}: {type(exc).__name__}: {exc}"}))
        return
    if gen.formatter is None and options.get("require_chat_template", True):
        conn.send(("fatal", {"code": "no_chat_template", "message": no_template_message(options["gguf"])}))
        return
    conn.send(("ready", gen.info()))
    pending: list[dict[str, Any]] = []
    while True:
        try:
            msg = pending.pop(0) if pending else conn.recv()
        except (EOFError, OSError):
            return  # the server went away
        if msg.get("op") != "generate":
            continue  # a cancel for a request that already finished
        rid = msg["id"]
        flag = {"cancelled": False}

        def cancelled(rid=rid, flag=flag) -> bool:
            # Between tokens: look for a cancel (the client went away) without blocking.
            while conn.poll():
                other = conn.recv()
                if other.get("op") == "cancel" and other.get("id") == rid:
                    flag["cancelled"] = True
                elif other.get("op") == "generate":
                    pending.append(other)
            return flag["cancelled"]

        try:
            gen.generate(msg, conn.send, cancelled)
        except Exception as exc:  # a Python-level failure in llama-cpp-python: report it, keep the worker
            conn.send(("error", rid, {"status": 500, "code": "generation_failed",
                                      "message": f"generation failed: {type(exc).__name__}: {exc}"}))
