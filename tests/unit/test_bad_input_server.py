"""Bad input to `finetune serve` and `finetune feedback` on the command line, as a user would type it. Each case: the
exit code, a message that names the culprit, and input files byte-identical afterwards (the GGUF and the feedback
store); a refused export writes nothing. Bad requests to a running server: tests/integration/test_bad_input_http.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

API_KEY = "bad-input-key-0123456789"
HELLO = [{"role": "user", "content": "Say hello."}]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
