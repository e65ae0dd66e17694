"""The feedback store and its export to training rows (messages format that prepare reads)."""

from __future__ import annotations

import json

import pytest

from finetune.feedback import STORE_FILE, FeedbackStore, store_dir_for, training_rows

Q1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
Q2 = [{"role": "user", "content": "Capital of France?"}]
Q3 = [{"role": "user", "content": "Say hi."}]


def test_approved_and_corrected_are_exported_rejected_are_not(tmp_path):
    store = FeedbackStore(tmp_path)
    a = store.add_exchange(Q1, "4", source="web")
    b = store.add_exchange(Q2, "Lyon", source="web")
    c = store.add_exchange(Q3, "Go away.", source="web")
    store.add_feedback(completion_id=a, rating="up")                       # from the log
    store.add_feedback(completion_id=b, rating="down")
    store.add_feedback(completion_id=b, correction="Paris.")               # a better answer replaces the reply
    store.add_feedback(completion_id=c, rating="down")                      # no correction: left out
    rows, stats = training_rows(store.feedback())
    assert rows == [
        {"messages": Q1 + [{"role": "assistant", "content": "4"}]},
        {"messages": Q2 + [{"role": "assistant", "content": "Paris."}]},
    ]
    assert stats == {"approved": 1, "corrected": 1, "rejected": 1, "duplicates": 0}
    assert store.counts() == {"exchanges": 3, "up": 1, "down": 2, "corrections": 1}
    store.close()


def test_latest_feedback_on_a_reply_wins_and_duplicates_are_dropped(tmp_path):
    store = FeedbackStore(tmp_path)
    a = store.add_exchange(Q2, "Paris")
    store.add_feedback(completion_id=a, rating="up")
    store.add_feedback(completion_id=a, rating="down")   # changed their mind
    store.add_feedback(messages=Q3, reply="Hi!", rating="up")
    store.add_feedback(messages=Q3, reply="Hi!", rating="up")  # same conversation twice, no id
    rows, stats = training_rows(store.feedback())
    assert rows == [{"messages": Q3 + [{"role": "assistant", "content": "Hi!"}]}]
    assert stats["rejected"] == 1 and stats["duplicates"] == 1
    store.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": Q2, "reply": "x"}, "give a rating"),
    ({"messages": Q2, "reply": "x", "rating": "meh"}, "rating"),
    ({"completion_id": "chatcmpl-unknown", "rating": "up"}, "not in this server's log"),
    ({"messages": [{"role": "wizard", "content": "x"}], "reply": "x", "rating": "up"}, "messages[0]"),
    ({"messages": "hello", "reply": "x", "rating": "up"}, "expected a list"),
])
def test_bad_feedback_is_refused_with_a_reason(tmp_path, kwargs, message):
    store = FeedbackStore(tmp_path)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        store.add_feedback(**kwargs)
    assert store.feedback() == []
    store.close()


def test_export_command_writes_prepare_rows(tmp_path, cli):
    store = FeedbackStore(tmp_path / "store")
    store.add_feedback(messages=Q2, reply="Paris", rating="up")
    store.add_feedback(messages=Q3, reply="...", correction="Hello!")
    store.close()
    out = tmp_path / "out.jsonl"
    code, stdout, _ = cli("feedback", "export", str(tmp_path / "store"), "-o", str(out))
    assert code == 0 and "wrote 2 conversations" in stdout and "1 approved, 1 corrected" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(r) == {"messages"} and r["messages"][-1]["role"] == "assistant" for r in rows)
    code, stdout, _ = cli("feedback", "stats", str(tmp_path / "store" / STORE_FILE))
    assert code == 0 and "1 thumbs up" in stdout and "1 better answers" in stdout


def test_export_without_a_store_says_where_feedback_comes_from(tmp_path, cli):
    code, _, err = cli("feedback", "export", str(tmp_path), "-o", str(tmp_path / "x.jsonl"))
    assert code == 2 and "no feedback store" in err and "finetune serve" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_store_locations(tmp_path, repo_root):
    recipe = repo_root / "recipes" / "quickstart.yaml"
    assert store_dir_for(recipe, [f"runs_dir={tmp_path}"]) == tmp_path / "quickstart" / "serve"
    gguf = tmp_path / "models" / "m-Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    assert store_dir_for(gguf) == gguf.parent.resolve() / "m-Q8_0.feedback"
    from finetune.models import embedded_gguf_path

    # never inside an installed package
    assert "site-packages" not in store_dir_for(embedded_gguf_path()).parts
