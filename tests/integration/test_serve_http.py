"""The server, for real: `finetune serve` on a loopback port with the embedded GGUF, spoken to with the official
`openai` client and raw HTTP. Assertions are about the protocol (the 135M Q4_1 model's answers are not judged)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

API_KEY = "test-key-0123456789"
MAX_PROMPT = 200
MAX_CONCURRENT = 2
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the name the server gives the embedded GGUF (its file stem)


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    from serve.launch import ServerProcess

    store = tmp_path_factory.mktemp("serve-store")
    overrides = [f"serve.max_prompt_tokens={MAX_PROMPT}", "serve.n_ctx=512", "serve.max_tokens=256",
                 f"serve.max_concurrent={MAX_CONCURRENT}", "serve.threads=1"]
    with ServerProcess(gguf, overrides, api_key=API_KEY, store=store) as srv:
        srv.store_dir = store
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def http(server, path: str, body: dict | bytes | None = None, *, key: str | None = API_KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def announce_huge_body(server) -> tuple[int, dict]:
    """Announce a 50 MB body and send none of it: the server must refuse on the header, before reading."""
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {API_KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders()
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def wait_healthy(server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if h["status"] == "ok" and h["in_flight"] == 0 and not any(w["busy"] for w in h["workers"]):
            return h
        time.sleep(0.2)
    raise AssertionError(f"server not idle and healthy after {timeout} s: {server.health()}")


HELLO = [{"role": "user", "content": "Say hello."}]


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = server.health()
    assert h["status"] == "ok" and h["auth"] is True and h["chat_template"] == "gguf" and h["n_ctx"] == 512


def test_chat_completion_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    """Greedy decoding: the streamed pieces join to the same text as the one-shot answer."""
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer should arrive in several pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_text_completion(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str) and r.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    status, body = http(server, "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = http(server, "/api/feedback", {"reply": "x", "messages": [], "rating": "up"}, key=None)
    assert status == 401
    assert server.health()["status"] == "ok"  # /health needs no key


def test_oversize_prompt_is_refused_and_server_stays_healthy(server, client):
    long = [{"role": "user", "content": "word " * (MAX_PROMPT * 2)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    assert f"at most {MAX_PROMPT}" in info.value.message
    with pytest.raises(openai.BadRequestError):  # the streaming path refuses before sending any chunk
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4, stream=True)
    status, body = announce_huge_body(server)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert wait_healthy(server)["status"] == "ok"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert r.choices[0].message.content is not None


def test_invalid_request_is_400_with_openai_error_shape(server):
    status, body = http(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "role" in body["error"]["message"]
    status, body = http(server, "/v1/chat/completions", {"messages": HELLO, "n": 3})
    assert status == 400


def test_over_the_concurrency_limit_is_429(server):
    wait_healthy(server)
    results: list[int] = []

    def one():
        status, _ = http(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 24, "temperature": 0})
        results.append(status)

    threads = [threading.Thread(target=one) for _ in range(MAX_CONCURRENT + 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(set(results)) == [200, 429], results
    assert results.count(200) >= MAX_CONCURRENT
    assert wait_healthy(server)["in_flight"] == 0


def test_a_killed_worker_fails_one_request_and_is_restarted(server, client):
    before = wait_healthy(server)["workers"][0]
    outcome: dict = {}

    def long_request():
        outcome["status"], outcome["body"] = http(
            server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell a long story."}],
                                             "max_tokens": 64, "temperature": 0})

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while not server.health()["workers"][0]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(before["pid"], 9)  # what a segfault in llama.cpp looks like from outside
    t.join(timeout=120)
    assert outcome["status"] == 500 and outcome["body"]["error"]["code"] == "worker_crashed", outcome
    health = wait_healthy(server)
    after = health["workers"][0]
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1, (before, health, server.log())
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert r.choices[0].message.content is not None
    log = server.log()
    assert f"model worker (pid {before['pid']}) crashed" in log, log
    assert "500 POST /v1/chat/completions worker_crashed" in log, log


def test_feedback_is_stored_and_exported(server, client, cli, tmp_path):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=64, temperature=0)
    assert r.choices[0].finish_reason == "stop", r
    reply = r.choices[0].message.content
    # By completion id only: the server looks the exchange up in its log.
    status, body = http(server, "/api/feedback", {"completion_id": r.id, "rating": "up"})
    assert status == 200 and body["stored"] is True
    # A reply cut at max_tokens and rated Good (the server's log knows it was cut) is not exported as approved.
    cut = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to twenty."}],
                                         max_tokens=2, temperature=0)
    assert cut.choices[0].finish_reason == "length"
    assert http(server, "/api/feedback", {"completion_id": cut.id, "rating": "up", "finish_reason": "stop"})[0] == 200
    status, body = http(server, "/api/feedback", {"messages": HELLO, "reply": "bad", "rating": "maybe"})
    assert status == 400
    status, counts = http(server, "/api/feedback")
    assert counts["up"] >= 1 and counts["exchanges"] >= 1
    out = tmp_path / "feedback.jsonl"
    code, stdout, _ = cli("feedback", "export", str(server.store_dir), "-o", str(out))
    assert code == 0, stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"messages": HELLO + [{"role": "assistant", "content": reply}]} in rows
    assert all(row["messages"][-1]["content"] != cut.choices[0].message.content for row in rows)
    assert "rated Good but cut at max_tokens" in stdout


@pytest.fixture(scope="module")
def gguf_without_template(gguf, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the embedded GGUF with its chat template removed (and the template, for --chat-template)."""
    import subprocess
    import sys

    import gguf as gguf_lib

    template = gguf_lib.GGUFReader(gguf).get_field("tokenizer.chat_template").contents()
    out = tmp_path_factory.mktemp("no-template") / "no-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf), str(out),
                    "--remove-metadata", "tokenizer.chat_template", "--force"], check=True, capture_output=True)
    return out, template


def test_gguf_without_chat_template_is_refused_not_guessed(cli, gguf_without_template):
    from serve.launch import free_port

    path, _ = gguf_without_template
    code, _, err = cli("serve", str(path), "--port", str(free_port()))
    assert code == 2 and "has no chat template" in err and "--chat-template" in err


def test_explicit_chat_template_file_is_used(gguf_without_template, tmp_path):
    from finetune.gguf.client import Worker

    path, template = gguf_without_template
    worker = Worker({"gguf": str(path), "n_ctx": 256, "threads": 1, "chat_template": template})
    try:
        assert worker.start()["chat_template"] == "file"
        worker.send({"op": "generate", "id": "r1", "mode": "chat", "messages": HELLO, "max_tokens": 3,
                     "temperature": 0})
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(worker.recv())
        assert events[0][0] == "start" and events[-1][0] == "done", events
    finally:
        worker.stop()


def test_client_disconnect_mid_stream_frees_the_worker(server, client):
    from http.client import HTTPConnection

    wait_healthy(server)
    exchanges = http(server, "/api/feedback")[1]["exchanges"]
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64,
                       "temperature": 0, "stream": True})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"data: ")
    conn.close()  # the user closed the tab
    t0 = time.monotonic()
    health = wait_healthy(server, timeout=60)
    assert health["in_flight"] == 0
    # A cancelled generation is not logged as an exchange; one that ran to its 64 tokens would be.
    assert http(server, "/api/feedback")[1]["exchanges"] == exchanges
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert r.choices[0].message.content is not None
    assert time.monotonic() - t0 < 60


def test_load_test_script_against_the_server(server):
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[2] / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    wait_healthy(server)
    result = load_test.run_load(server.url, clients=MAX_CONCURRENT, requests=2, max_tokens=4, api_key=API_KEY)
    assert result["successes"] == MAX_CONCURRENT * 2 and result["failures"] == 0, result
    assert 0 < result["p50_s"] <= result["p95_s"] <= result["max_s"]


def test_foreign_host_header_is_refused_on_loopback(server):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the local model."""
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/health", headers={"Host": f"evil.example:{server.port}"})
    assert conn.getresponse().status == 400
    conn.close()
    assert server.health()["status"] == "ok"  # with its own host name it answers


# ------------------------------------------------------------------------------------------- OpenAI protocol
def test_unknown_model_is_404_and_retrieve_works(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert info.value.code == "model_not_found" and "gpt-4o" in info.value.message and MODEL in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert client.models.retrieve(MODEL).owned_by == "finetune"
    # the model may be left out (the web page and scripts/load_test.py do)
    status, body = http(server, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    assert status == 200 and body["model"] == MODEL


def test_empty_prompt_and_empty_stop_are_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="", max_tokens=2)
    assert "prompt" in info.value.message
    for stop in ("", ["\n", ""]):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stop=stop)
        assert "stop" in info.value.message and "empty stop string" in info.value.message


def test_unsupported_parameters_are_refused_by_name(client):
    cases = [({"logprobs": True}, "logprobs"), ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
             ({"extra_body": {"best_of": 3}}, "best_of"), ({"extra_body": {"mirostat": 2}}, "mirostat")]
    for kwargs, name in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **kwargs)
        assert info.value.code == "unsupported_parameter" and name in info.value.message, info.value.message
        assert info.value.param == name
    with pytest.raises(openai.BadRequestError) as info:  # echo is a completions parameter, not a chat one
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body={"echo": True})
    assert "echo" in info.value.message
    # "off" values of unimplemented parameters are not a request for anything: accepted
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logprobs=False, tools=None,
                                       user="someone")
    assert r.choices[0].message.content is not None


def test_implemented_sampling_parameters(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=1.0, seed=7)
    assert r.choices[0].message.content
    # logit_bias -100 on the greedy first token: that token cannot come first any more
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    tokens = greedy.usage.completion_tokens
    assert tokens == 1
    from llama_cpp import Llama

    from finetune.models import embedded_gguf_path

    vocab = Llama(str(embedded_gguf_path()), vocab_only=True, verbose=False)
    first = vocab.tokenize(greedy.choices[0].text.encode(), add_bos=False, special=False)[0]
    biased = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert biased.choices[0].text != greedy.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text.startswith("The capital of France is")
    js = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give a JSON object."}],
                                        max_tokens=24, temperature=0, response_format={"type": "json_object"})
    assert js.choices[0].message.content.lstrip().startswith("{"), js.choices[0].message.content


def test_404_and_405_use_the_openai_error_shape(server):
    status, body = http(server, "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/nothing-here" in body["error"]["message"]
    status, body = http(server, "/v1/models", {"x": 1})  # POST where only GET exists
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_4xx_answers_leave_one_console_line(server):
    http(server, "/v1/chat/completions", {"model": "no-such-model", "messages": HELLO})
    deadline = time.monotonic() + 10
    while "404 POST /v1/chat/completions model_not_found" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "404 POST /v1/chat/completions model_not_found: model 'no-such-model'" in server.log()


# ----------------------------------------------------------------------------------- body limit, disconnects
def server_peak_rss_kb(server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_chunked_oversize_body_is_refused_while_reading(server):
    """100 MiB sent chunked (no Content-Length): 413 in OpenAI's shape, and the server's memory peak stays flat
    (it counts while reading and throws the rest away instead of holding the body)."""
    import socket

    wait_healthy(server)
    peak_before = server_peak_rss_kb(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    piece = b'{"messages": [' + b" " * (1 << 16)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    t0 = time.monotonic()
    for _ in range(100 << 4):  # 1600 x 64 KiB
        sock.sendall(chunk)
    sock.sendall(b"0\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
        data = sock.recv(65536)
        if not data:
            break
        response += data
    sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "limit" in error["message"]
    growth_mb = (server_peak_rss_kb(server) - peak_before) / 1024
    assert growth_mb < 20, f"the server's memory peak grew by {growth_mb:.0f} MB reading a refused body"
    assert time.monotonic() - t0 < 60
    assert server.health()["status"] == "ok"


def test_disconnect_cancels_non_streaming_requests_running_and_queued(server, client):
    """Two non-streaming requests that would each generate 256 tokens: one running, one queued. Both clients hang
    up: the worker stops between two tokens, the queued one never runs, the next short request is answered in
    under a second."""
    from http.client import HTTPConnection

    before = wait_healthy(server)
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 256, "temperature": 0})
    conns = []
    for expected_in_flight in (1, 2):
        conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        conns.append(conn)
        deadline = time.monotonic() + 30
        while server.health()["in_flight"] < expected_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
    health = server.health()
    assert health["in_flight"] == 2 and health["workers"][0]["busy"], health
    for conn in conns:
        conn.sock.shutdown(2)
        conn.close()  # both users closed the tab
    t0 = time.monotonic()
    while server.health()["in_flight"] and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    idle_after = time.monotonic() - t0
    t1 = time.monotonic()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
    answered = time.monotonic() - t1
    assert r.choices[0].message.content is not None
    assert answered < 1.0, f"the next short request took {answered:.2f} s (idle after {idle_after:.2f} s)"
    after = server.health()
    assert after["workers"][0]["pid"] == before["workers"][0]["pid"]  # cancelled, not killed
    assert after["served"] == before["served"] + 1  # only the short request ran to its end


# ----------------------------------------------------------------------------------------- hosts and health
def test_loopback_alias_host_answers_its_own_host_header(gguf, tmp_path):
    """--host 127.0.0.2 (any loopback address) answers requests addressed to it, not "Invalid host header"."""
    from serve.launch import ServerProcess

    with ServerProcess(gguf, ["serve.threads=1", "serve.n_ctx=256"], host="127.0.0.2", store=tmp_path) as srv:
        assert srv.url.startswith("http://127.0.0.2:")
        status, body = http(srv, "/v1/models", key=None)
        assert status == 200 and body["data"][0]["id"] == MODEL
        h = srv.health()
        assert h["model"] == MODEL and "gguf" in h  # loopback: /health shows the details


def test_network_host_ipv6_wildcard_and_health_without_key(gguf, tmp_path):
    """--host :: listens on every address (IPv6 and IPv4); there /health without the key says only "ok"."""
    from serve.launch import ServerProcess

    with ServerProcess(gguf, ["serve.threads=1", "serve.n_ctx=256"], host="::", api_key=API_KEY,
                       store=tmp_path) as srv:
        assert srv.url.startswith("http://[::1]:")
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        full = srv.health()  # with the key
        assert full["model"] == MODEL and full["workers"][0]["pid"]
        status, body = http(srv, "/v1/models", key=None)
        assert status == 401


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_tools_with_a_template_without_a_call_format_are_refused(client):
    """The embedded model's template (SmolLM2 ChatML) writes no tools: asking for them is a 400, not an answer
    that silently ignored them."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, tools=TOOLS)
    assert info.value.code == "tools_unsupported", info.value.message


def test_tool_messages_are_validated_like_training_rows(client):
    messages = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Oslo}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, tools=TOOLS)
    assert "messages[1].tool_calls[0].function.arguments is not valid JSON" in info.value.message


def test_worker_returns_tool_calls_and_reasoning_in_openai_shape(gguf):
    """The worker with a ChatML tool template (Qwen2.5's, same turn tokens as the embedded model): a request with
    tools and a finished tool round renders, and a reply is read into OpenAI's assistant message."""
    from finetune.gguf import sdist
    from finetune.gguf.worker import Generator

    root = sdist.llama_cpp_dir(download=False)
    if root is None or not (root / "models" / "templates").is_dir():
        pytest.skip("llama.cpp source cache (templates) is absent: run `make install`")
    template = (root / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    gen = Generator(str(gguf), n_ctx=512, threads=1, chat_template=template)
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt, _ = gen.render_chat(messages, TOOLS)
    assert '"name": "get_weather"' in prompt and "<tool_response>\nsunny\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    message = gen.reply_message('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
                                TOOLS)
    (call,) = message["tool_calls"]
    assert message["content"] is None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    events = []
    gen.generate({"id": "r1", "mode": "chat", "messages": messages, "tools": TOOLS, "max_tokens": 8,
                  "temperature": 0}, events.append, lambda: False)
    assert events[0][0] == "start" and events[-1][0] == "done", events
    assert events[-1][2]["message"]["role"] == "assistant"
    thinking = gen.reply_message("<think>\nhm\n</think>\n\nOslo is sunny.", None)
    assert thinking == {"role": "assistant", "content": "Oslo is sunny.", "reasoning_content": "hm"}
