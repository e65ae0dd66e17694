"""Bad input to `finetune serve` and `finetune feedback`, as a user or a client would send it. Each case: the HTTP
status or exit code, a message that names the culprit, and input files byte-identical afterwards (the GGUF and
the feedback store); refused feedback stores nothing and a refused export writes nothing."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

API_KEY = "bad-input-key-0123456789"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
HELLO = [{"role": "user", "content": "Say hello."}]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gguf() -> Path:
    from finetune.models import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    from serve.launch import ServerProcess

    store = tmp_path_factory.mktemp("bad-input-store")
    gguf_before = digest(gguf)
    with ServerProcess(gguf, ["serve.n_ctx=512", "serve.max_tokens=16", "serve.threads=1"], api_key=API_KEY,
                       store=store) as srv:
        srv.store_dir = store
        yield srv
    assert digest(gguf) == gguf_before


def send(server, method: str, path: str, body: dict | bytes | None = None, *, key: str | None = API_KEY,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        all_headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/api/feedback"

# (id, method, path, body, status, words the message must contain)
HTTP_CASES = [
    ("unknown-model", "POST", CHAT, {"model": "gpt-4o", "messages": HELLO}, 404, ["'gpt-4o'", MODEL]),
    ("unknown-model-completions", "POST", COMPLETIONS, {"model": "llama3", "prompt": "Hi"}, 404, ["'llama3'"]),
    ("retrieve-unknown-model", "GET", "/v1/models/gpt-4o", None, 404, ["'gpt-4o'"]),
    ("empty-prompt", "POST", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, ["prompt"]),
    ("prompt-not-text", "POST", COMPLETIONS, {"prompt": 42}, 400, ["prompt"]),
    ("empty-stop", "POST", CHAT, {"messages": HELLO, "stop": ""}, 400, ["stop", "empty stop string"]),
    ("empty-stop-in-list", "POST", CHAT, {"messages": HELLO, "stop": ["x", ""]}, 400, ["stop"]),
    ("five-stops", "POST", CHAT, {"messages": HELLO, "stop": list("abcde")}, 400, ["stop", "at most 4"]),
    ("logprobs", "POST", CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 2}, 400,
     ["logprobs", "top_logprobs"]),
    ("tools", "POST", CHAT, {"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     ["tools"]),
    ("functions", "POST", CHAT, {"messages": HELLO, "functions": [{"name": "f"}]}, 400, ["functions"]),
    ("echo-on-chat", "POST", CHAT, {"messages": HELLO, "echo": True}, 400, ["echo"]),
    ("suffix", "POST", COMPLETIONS, {"prompt": "def f(", "suffix": "return 1"}, 400, ["suffix"]),
    ("unknown-parameter", "POST", CHAT, {"messages": HELLO, "mirostat_tau": 5}, 400, ["mirostat_tau"]),
    ("n-two", "POST", CHAT, {"messages": HELLO, "n": 2}, 400, ["n"]),
    ("temperature-too-high", "POST", CHAT, {"messages": HELLO, "temperature": 3}, 400, ["temperature"]),
    ("penalty-out-of-range", "POST", CHAT, {"messages": HELLO, "presence_penalty": 5}, 400, ["presence_penalty"]),
    ("logit-bias-out-of-range", "POST", CHAT, {"messages": HELLO, "logit_bias": {"15": 500}}, 400,
     ["logit_bias", "500"]),
    ("logit-bias-outside-the-vocabulary", "POST", CHAT, {"messages": HELLO, "logit_bias": {"999999": 5}}, 400,
     ["logit_bias", "999999", "vocabulary"]),
    ("logit-bias-not-a-token-id", "POST", CHAT, {"messages": HELLO, "logit_bias": {"hello": 1}}, 400, ["logit_bias"]),
    ("max-tokens-zero", "POST", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, ["max_tokens"]),
    ("no-messages", "POST", CHAT, {"messages": []}, 400, ["messages"]),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["role"]),
    ("image-part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, ["image_url"]),
    ("json-schema-not-an-object", "POST", CHAT, {"messages": HELLO, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": "a string"}}}, 400, ["json_schema"]),
    ("response-format-unknown-type", "POST", CHAT, {"messages": HELLO, "response_format": {"type": "yaml"}}, 400,
     ["response_format"]),
    ("stream-options-unknown-key", "POST", CHAT, {"messages": HELLO, "stream": True,
                                                  "stream_options": {"include_usag": True}}, 400, ["include_usag"]),
    ("broken-json", "POST", CHAT, b'{"messages": [', 400, ["json", "invalid"]),
    ("unknown-path", "GET", "/v1/embeddings", None, 404, ["/v1/embeddings", "no such endpoint"]),
    ("wrong-method", "DELETE", "/v1/models", None, 405, ["DELETE"]),
    ("feedback-bad-rating", "POST", FEEDBACK, {"messages": HELLO, "reply": "x", "rating": "maybe"}, 400, ["rating"]),
    ("feedback-unknown-field", "POST", FEEDBACK, {"messages": HELLO, "reply": "x", "rating": "up", "stars": 5}, 400,
     ["stars"]),
    ("feedback-context-ends-with-assistant", "POST", FEEDBACK, {
        "messages": HELLO + [{"role": "assistant", "content": "Hello"}], "reply": "x", "rating": "up"}, 400,
     ["messages", "'assistant'"]),
    ("feedback-unknown-completion-id", "POST", FEEDBACK, {"completion_id": "chatcmpl-nope", "rating": "up"}, 400,
     ["completion id"]),
    ("feedback-nothing-to-store", "POST", FEEDBACK, {"messages": HELLO, "reply": "x"}, 400, ["rating", "correction"]),
    ("feedback-bad-finish-reason", "POST", FEEDBACK, {"messages": HELLO, "reply": "x", "rating": "up",
                                                      "finish_reason": "timeout"}, 400, ["finish_reason"]),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_request_is_refused_in_openai_shape_naming_the_culprit(server, case):
    _, method, path, body, status, words = case
    store = server.store_dir / "feedback.sqlite3"
    counts_before = send(server, "GET", FEEDBACK)[1]
    got, answer = send(server, method, path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    message = answer["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    counts_after = send(server, "GET", FEEDBACK)[1]
    assert counts_after["up"] == counts_before["up"] and counts_after["down"] == counts_before["down"]
    assert store.exists()


def test_wrong_key_is_401_and_the_page_and_health_still_answer(server):
    status, answer = send(server, "POST", CHAT, {"messages": HELLO}, key="wrong")
    assert status == 401 and "API key" in answer["error"]["message"]
    assert server.health()["status"] == "ok"


def test_oversize_content_length_is_413_before_reading(server):
    status, answer = send(server, "POST", CHAT, b"{" + b" " * (2 << 20) + b"}")
    assert status == 413 and "limit" in answer["error"]["message"] and answer["error"]["code"] == "request_too_large"


def test_foreign_host_header_is_400_naming_the_host(server):
    status, answer = send(server, "GET", "/v1/models", headers={"Host": "evil.example"})
    assert status == 400 and "evil.example" in answer["error"]["message"]


# ------------------------------------------------------------------------------------------------ the CLI
def test_network_host_without_key_is_refused(cli, gguf, monkeypatch):
    monkeypatch.delenv("FINETUNE_API_KEY", raising=False)
    before = digest(gguf)
    code, _, err = cli("serve", str(gguf), "--host", "::")
    assert code == 2 and "refusing to listen on :: without an API key" in err
    assert digest(gguf) == before


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], ["--port", "70000"]),
    (["--port", "0"], ["--port"]),
], ids=["port-too-high", "port-zero"])
def test_bad_serve_flags_name_the_flag(cli, gguf, args, words):
    before = digest(gguf)
    code, _, err = cli("serve", str(gguf), *args)
    assert code == 2, err
    for word in words:
        assert word in err
    assert digest(gguf) == before


@pytest.mark.parametrize("host", ["10.255.255.1", "no-such-host.invalid"])
def test_host_that_is_not_on_this_machine_is_named(cli, gguf, host):
    code, _, err = cli("serve", str(gguf), "--host", host, "--api-key", API_KEY)
    assert code == 2 and f"--host {host}: no such address" in err, err


def test_serve_missing_gguf_names_it(cli, tmp_path):
    code, _, err = cli("serve", str(tmp_path / "nope.gguf"))
    assert code == 2 and "nope.gguf" in err


@pytest.fixture
def store(tmp_path) -> Path:
    from finetune.feedback_store import FeedbackStore

    s = FeedbackStore(tmp_path / "store")
    s.add_feedback(messages=HELLO, reply="Hello!", rating="up")
    s.close()
    return tmp_path / "store"


@pytest.mark.parametrize("out, words", [
    ("folder", ["is a folder"]),
    ("rows.json", ["rows.json", ".jsonl"]),
], ids=["out-is-a-folder", "out-not-jsonl"])
def test_bad_export_output_is_refused_and_nothing_is_written(cli, store, tmp_path, out, words):
    (tmp_path / "folder").mkdir()
    before = digest(store / "feedback.sqlite3")
    code, _, err = cli("feedback", "export", str(store), "-o", str(tmp_path / out))
    assert code == 2, err
    for word in words:
        assert word in err
    assert digest(store / "feedback.sqlite3") == before
    assert not (tmp_path / "rows.json").exists() and list((tmp_path / "folder").iterdir()) == []


def test_export_bad_train_on_is_refused(cli, store, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli("feedback", "export", str(store), "-o", str(tmp_path / "x.jsonl"), "--train-on", "everything")
    assert info.value.code == 2 and "--train-on" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_export_and_stats_without_a_store_name_the_place(cli, tmp_path):
    code, _, err = cli("feedback", "export", str(tmp_path), "-o", str(tmp_path / "x.jsonl"))
    assert code == 2 and str(tmp_path / "feedback.sqlite3") in err and not (tmp_path / "x.jsonl").exists()
    code, _, err = cli("feedback", "stats", str(tmp_path / "missing"))
    assert code == 2 and "no feedback store" in err


def test_export_leaves_out_and_says_why(cli, store, tmp_path):
    from finetune.feedback_store import FeedbackStore

    s = FeedbackStore(store)
    s.add_feedback(messages=HELLO, reply="Hel", rating="up", finish_reason="stopped")
    s.add_feedback(messages=HELLO, reply="Go away.", rating="down")
    s.close()
    before = digest(store / "feedback.sqlite3")
    code, out, _ = cli("feedback", "export", str(store), "-o", str(tmp_path / "x.jsonl"))
    assert code == 0
    assert "left out 2" in out and "1 rated Bad without a better answer" in out and "stopped by the user" in out
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == 1
    assert digest(store / "feedback.sqlite3") == before
