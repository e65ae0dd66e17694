"""Bad requests to a running `finetune serve` (the embedded GGUF on a loopback port), as a client would send them:
the HTTP status, an OpenAI-shaped error that names the culprit, the GGUF byte-identical afterwards, and refused
feedback stores nothing. The same command's bad flags and `finetune feedback` are tests/unit/test_bad_input_server.py."""

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


CHAT, COMPLETIONS, FEEDBACK = "/v1/chat/completions", "/v1/completions", "/api/feedback"


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
