"""``finetune chat RECIPE|MODEL.gguf`` (or ``--url http://127.0.0.1:8765``): chat with the model in the terminal.

Replies stream token by token. Without --url the GGUF runs in a child process (finetune/gguf/client.py: llama.cpp
with the GGUF's own chat template; a native crash ends the reply with an error, not the chat), and the server
package is not needed; with --url it talks to a running ``finetune serve`` over its OpenAI-compatible API (the
``openai`` client).

Input: Enter sends; end a line with a backslash to continue on the next one, or type three quotes on a line of
their own to start and end a block. Commands:
    /reset            forget the conversation (keeps the system prompt)
    /system [TEXT]    show or set the system prompt ("/system -" removes it); starts a new conversation
    /save [FILE]      write the conversation as JSON ({"messages": [...]}, the format prepare reads)
    /good  /bad       rate the last reply (stored for `finetune feedback export`)
    /better           type a better answer for the last reply (stored as a correction)
    /help  /quit
Ctrl-C stops a reply being generated; Ctrl-D (or /quit) leaves.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from finetune.errors import UserError

HELP = __doc__.split("Input:", 1)[1].strip()
BLOCK = '"""'


# --------------------------------------------------------------------------------------------- backends
class LocalBackend:
    """The GGUF in a worker process; conversations and feedback go to the local store."""

    def __init__(self, target: Any):
        from finetune.feedback_store import FeedbackStore
        from finetune.gguf.client import Worker
        from finetune.serve_target import worker_options

        self.target = target
        self.name = target.name
        self.worker = Worker(worker_options(target))
        self.worker.start()  # no chat template, or a crash while loading: a UserError
        self.store = FeedbackStore(target.store_dir)
        self.last_id: str | None = None
        self.finish_reason: str | None = None

    def stream(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int) -> Iterator[str]:
        # a reply stopped half-way (Ctrl-C closes this iterator, which cancels it) has no stored exchange
        previous, self.last_id = self.last_id, None
        request = {"mode": "chat", "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                   "max_prompt_tokens": self.target.config.prompt_limit}
        try:
            for kind, payload in self.worker.stream(request):
                if kind == "delta":
                    yield payload
                elif kind == "done":
                    self.finish_reason = payload["finish_reason"]
                    self.last_id = self.store.add_exchange(messages, payload["text"], model=self.name,
                                                           finish_reason=self.finish_reason, source="chat",
                                                           params={"temperature": temperature, "max_tokens": max_tokens})
        except UserError:  # refused, or the worker crashed (it was restarted): the reply ends with the error
            self.last_id = previous  # nothing was answered: the last reply is still the previous one
            raise

    def feedback(self, messages: list[dict[str, str]], reply: str, **kw: Any) -> str:
        self.store.add_feedback(messages=messages, reply=reply, completion_id=self.last_id, source="chat", **kw)
        return str(self.store.path)

    def close(self) -> None:
        self.worker.stop()
        self.store.close()


class HttpBackend:
    """A running `finetune serve` (or any OpenAI-compatible server) at --url, through the ``openai`` client."""

    def __init__(self, url: str, api_key: str | None):
        import openai

        self.base = url.rstrip("/").removesuffix("/v1")
        # The client insists on a key; a server started without one ignores the header.
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=api_key or "no-key", timeout=600,
                                    max_retries=0)
        self.last_id: str | None = None
        self.finish_reason: str | None = None
        # /v1/models needs the key: a wrong one is reported now, not at the first message.
        with self._errors():
            self.name = self.client.models.list().data[0].id

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The client's exceptions as one-line UserErrors: the URL and status, and the server's own message."""
        import openai

        try:
            yield
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") or exc.response.reason_phrase
            raise UserError(f"{exc.request.url}: HTTP {exc.status_code}: {message}") from None
        except openai.APIConnectionError as exc:  # refused, unreachable, timed out
            raise UserError(f"cannot reach {self.base} ({exc.__cause__ or exc}); is `finetune serve` running "
                            "there?") from None
        except openai.APIError as exc:  # an error event inside the stream
            raise UserError(f"server error: {exc.message}") from None

    def stream(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int) -> Iterator[str]:
        self.last_id = None
        with self._errors():
            chunks = self.client.chat.completions.create(
                model=self.name, messages=messages, temperature=temperature, max_tokens=max_tokens, stream=True,
                extra_body={"source": "chat"})
            with chunks:
                for chunk in chunks:
                    self.last_id = chunk.id or self.last_id
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            self.finish_reason = choice.finish_reason
                        if choice.delta and choice.delta.content:
                            yield choice.delta.content

    def feedback(self, messages: list[dict[str, str]], reply: str, **kw: Any) -> str:
        body = {"completion_id": self.last_id, "messages": messages, "reply": reply, "source": "chat", **kw}
        with self._errors():  # finetune's own endpoint, beside the OpenAI API: same client, key and errors
            self.client.post(self.base + "/api/feedback", cast_to=object, body=body)
        return f"{self.base} feedback store"

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------- the loop
def read_message(read_line: Callable[[str], str]) -> str:
    """One user message: a line, a backslash-continued run of lines, or a triple-quoted block."""
    first = read_line("you> ")
    if first.strip() == BLOCK:
        lines = []
        while (line := read_line("... ")).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line("... "))
    return "\n".join(lines)


def chat_loop(backend: Any, *, system: str | None = None, temperature: float = 0.7, max_tokens: int = 256,
              read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict[str, str]]:
    """Run the conversation until /quit or end of input; returns the last conversation."""
    session = Session(backend, read_line, out, temperature=temperature, max_tokens=max_tokens,
                      messages=[{"role": "system", "content": system}] if system else [])
    session.say(f"chatting with {backend.name}. /help for commands, Ctrl-D to leave.")
    while True:
        try:
            text = read_message(read_line)
        except (EOFError, KeyboardInterrupt):
            session.say()
            return session.messages
        command, _, arg = text.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return session.messages
        if command in COMMANDS:
            getattr(session, COMMANDS[command])(command, arg.strip())
        elif text.startswith("/"):
            session.say(f"unknown command {command}; /help lists them (start a message with a space to send a slash)")
        elif text.strip():
            session.reply(text)


COMMANDS = {"/help": "help", "/reset": "reset", "/system": "system", "/save": "save",
            "/good": "rate", "/bad": "rate", "/better": "rate"}


class Session:
    """One terminal conversation: its messages, how the last reply ended, and what each command does to them."""

    def __init__(self, backend: Any, read_line: Callable[[str], str], out: TextIO, *, temperature: float,
                 max_tokens: int, messages: list[dict[str, str]]):
        self.backend, self.read_line, self.out = backend, read_line, out
        self.temperature, self.max_tokens = temperature, max_tokens
        self.messages = messages
        self.finish_reason: str | None = None  # how the last reply ended: stop, length (max_tokens) or stopped

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def help(self, command: str, arg: str) -> None:
        self.say(HELP)

    def reset(self, command: str, arg: str) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.say("(new conversation)")

    def system(self, command: str, arg: str) -> None:
        if not arg:
            current = next((m["content"] for m in self.messages if m["role"] == "system"), None)
            self.say(f"system prompt: {current!r}" if current else "no system prompt (set one with /system TEXT)")
            return
        self.messages = [] if arg == "-" else [{"role": "system", "content": arg}]
        self.say("(system prompt removed; new conversation)" if arg == "-" else "(system prompt set; new conversation)")

    def save(self, command: str, arg: str) -> None:
        path = Path(arg or f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.say(f"(saved {len(self.messages)} messages to {path})")

    def rate(self, command: str, arg: str) -> None:
        """/good, /bad or /better on the last reply, stored through the backend for `finetune feedback export`."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.say("(no reply to rate yet)")
            return
        context, reply = self.messages[:-1], self.messages[-1]["content"]
        if command == "/better":
            self.say('type the better answer (end with a line with """ or an empty line):')
            lines = []
            while (line := self.read_line("... ")).strip() not in (BLOCK, ""):
                lines.append(line)
            if not lines:
                self.say("(nothing stored)")
                return
            where = self.backend.feedback(context, reply, correction="\n".join(lines))
        else:
            where = self.backend.feedback(context, reply, rating="up" if command == "/good" else "down",
                                          finish_reason=self.finish_reason)
        self.say(f"(stored in {where})")
        if command == "/good" and self.finish_reason in ("length", "stopped"):
            self.say("(this reply is unfinished, so it is not exported as a good example; /better gives a complete one)")

    def reply(self, text: str) -> None:
        """Send ``text``, stream the model's reply (Ctrl-C stops it) and keep both in the conversation."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        self.out.write("model> ")
        self.backend.finish_reason = None
        try:
            for piece in self.backend.stream(self.messages, temperature=self.temperature, max_tokens=self.max_tokens):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
            self.finish_reason = self.backend.finish_reason
        except KeyboardInterrupt:
            self.finish_reason = "stopped"
            self.say("\n(stopped)")
        except UserError as exc:
            self.say(f"\nerror: {exc}")
            self.messages.pop()
            return
        self.say()
        if self.backend.finish_reason == "length":
            self.say(f"(cut at {self.max_tokens} tokens; raise with --max-tokens)")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def run(target: str | None, overrides: Sequence[str] = (), *, url: str | None = None, api_key: str | None = None,
        system: str | None = None, temperature: float = 0.7, max_tokens: int = 256) -> int:
    """Chat in the terminal with ``target`` (a recipe, with its ``overrides``, or a .gguf file) or, with ``url``, a
    running server (``api_key``, else FINETUNE_API_KEY); input from the terminal, or piped (no prompts echoed)."""
    import os

    if url:
        backend: Any = HttpBackend(url, api_key or os.environ.get("FINETUNE_API_KEY"))
    elif target:
        from finetune.serve_target import resolve_target

        backend = LocalBackend(resolve_target(target, list(overrides)))
    else:
        raise UserError("give a recipe or a .gguf file to chat with, or --url of a running `finetune serve`")
    read_line = input
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    else:  # piped input: no prompts echoed into the transcript, EOF ends the chat
        def read_line(prompt: str) -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
    try:
        chat_loop(backend, system=system, temperature=temperature, max_tokens=max_tokens, read_line=read_line)
    finally:
        backend.close()
    return 0
