"""`finetune chat` for real: the terminal loop against the embedded GGUF directly (a llama.cpp worker process, also
with the server package unimportable) and against a running server, through the loop and through the CLI in a child
process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import urllib.request

import pytest
from chat_fixtures import scripted

from finetune.chat import HttpBackend, LocalBackend, chat_loop
from finetune.feedback_store import FeedbackStore


def test_local_chat_streams_saves_resets_and_rates(gguf, tmp_path):
    from finetune.serve_target import resolve_target

    target = dataclasses.replace(resolve_target(str(gguf), ["serve.threads=1", "serve.n_ctx=512"]),
                                 store_dir=tmp_path / "store")
    backend = LocalBackend(target)
    out = io.StringIO()
    saved, after_reset = tmp_path / "conv.json", tmp_path / "after-reset.json"
    try:
        chat_loop(backend, temperature=0, max_tokens=4, out=out, read_line=scripted([
            "/system Be brief.", "Hello", "first line\\", "second line", "/good", f"/save {saved}",
            "/reset", f"/save {after_reset}", "/nonsense",
        ]))
    finally:
        backend.close()
    transcript = out.getvalue()
    assert transcript.count("model> ") == 2 and "unknown command /nonsense" in transcript
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[3]["content"] == "first line\nsecond line"
    assert all(m["content"] for m in messages)  # the replies streamed into the transcript were kept
    assert json.loads(after_reset.read_text())["messages"] == [messages[0]]
    store = FeedbackStore(tmp_path / "store")
    fb = store.feedback()
    assert store.counts()["exchanges"] == 2 and len(fb) == 1
    assert fb[0]["rating"] == "up" and fb[0]["messages"] == messages[:4] and fb[0]["reply"] == messages[4]["content"]
    store.close()


def test_terminal_chat_needs_no_server_package(gguf, tmp_path):
    """`finetune chat MODEL.gguf` with `serve` unimportable: the worker, the target and the store are finetune's."""
    script = "import sys; sys.modules['serve'] = None\nfrom finetune.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", script, "chat", str(gguf), "serve.threads=1", "serve.n_ctx=512", "--max-tokens", "3"],
        input="Hi\n/good\n", capture_output=True, text=True, timeout=180,
        env={**os.environ, "FINETUNE_CACHE": str(tmp_path)},  # a packaged GGUF's feedback goes to the cache
    )
    assert proc.returncode == 0, proc.stderr
    assert "model> " in proc.stdout and "(stored in" in proc.stdout
    assert (tmp_path / "feedback" / gguf.stem / "feedback.sqlite3").is_file()


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    from serve.launch import ServerProcess

    with ServerProcess(gguf, ["serve.threads=1", "serve.n_ctx=512"], api_key="chat-key",
                       store=tmp_path_factory.mktemp("chat-store")) as srv:
        yield srv


def counts(server) -> dict:
    req = urllib.request.Request(server.url + "/api/feedback", headers={"Authorization": "Bearer chat-key"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_chat_against_a_server_with_a_correction(server):
    backend = HttpBackend(server.url, "chat-key")
    out = io.StringIO()
    before = counts(server)["corrections"]
    chat_loop(backend, temperature=0, max_tokens=4, out=out,
              read_line=scripted(["Hi", "/better", "Hello! How can I help?", ""]))
    assert backend.name == "SmolLM2-135M-Instruct.Q4_1" and out.getvalue().count("model> ") == 1
    assert counts(server)["corrections"] == before + 1


def test_chat_cli_against_a_server(server, finetune):
    before = counts(server)["up"]
    proc = finetune("chat", "--url", server.url, "--api-key", "chat-key", "--max-tokens", "4", input="Hi\n/good\n",
                    timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model> " in proc.stdout and "(stored in" in proc.stdout
    assert counts(server)["up"] == before + 1


def test_chat_cli_with_a_wrong_key_says_so(server, finetune):
    proc = finetune("chat", "--url", server.url, "--api-key", "nope", input="Hi\n", timeout=60)
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr and "API key" in proc.stderr


def test_a_worker_crash_ends_the_reply_with_an_error_not_the_chat(gguf, tmp_path):
    """The worker dies mid-reply: that reply ends with a one-line error, the worker is restarted and answers the next
    message; a worker that died between two messages is restarted before the next one."""
    from finetune.errors import UserError
    from finetune.serve_target import resolve_target

    target = dataclasses.replace(resolve_target(str(gguf), ["serve.threads=1", "serve.n_ctx=512"]),
                                 store_dir=tmp_path / "store")
    backend = LocalBackend(target)
    try:
        reply = backend.stream([{"role": "user", "content": "Tell me a long story."}], temperature=0, max_tokens=200)
        assert next(reply)
        backend.worker.process.kill()
        with pytest.raises(UserError, match=r"crashed during this reply \(it was restarted\)"):
            list(reply)
        assert "".join(backend.stream([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3))
        backend.worker.process.kill()
        backend.worker.process.join()
        assert "".join(backend.stream([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=3))
        assert backend.worker.restarts == 2
    finally:
        backend.close()
