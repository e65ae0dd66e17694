"""`finetune chat` without a model: a message typed over several lines, and a --url where no server listens. The
loop against the GGUF and against a running server: tests/integration/test_chat_terminal.py."""

from __future__ import annotations

import socket

import pytest
from chat_fixtures import scripted

from finetune.chat import HttpBackend, read_message
from finetune.errors import UserError


def test_read_message_multiline_forms():
    assert read_message(scripted(["one line"])) == "one line"
    assert read_message(scripted(["first \\", "second\\", "third"])) == "first \nsecond\nthird"
    assert read_message(scripted(['"""', "a", "", "b", '"""'])) == "a\n\nb"


def test_chat_with_no_server_at_the_url_says_so():
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UserError, match=r"cannot reach http://127\.0\.0\.1:\d+ \(.*\); is `finetune serve` running"):
        HttpBackend(f"http://127.0.0.1:{port}/v1", None)
