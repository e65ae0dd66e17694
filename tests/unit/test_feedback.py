"""The feedback store and its export to training rows (messages format that prepare reads)."""

from __future__ import annotations

import json

import pytest

from finetune.data.feedback import training_rows
from finetune.feedback_store import STORE_FILE, FeedbackStore, store_dir_for

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
    assert stats == {"approved": 1, "corrected": 1, "left_out": {"rated_bad": 1}}
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
    assert stats["left_out"] == {"rated_bad": 1, "duplicate": 1}
    store.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"messages": Q2, "reply": "x"}, "give a rating"),
    ({"messages": Q2, "reply": "x", "rating": "meh"}, "rating"),
    ({"completion_id": "chatcmpl-unknown", "rating": "up"}, "not in this server's log"),
    ({"messages": [{"role": "wizard", "content": "x"}], "reply": "x", "rating": "up"}, "messages[0]"),
    ({"messages": "hello", "reply": "x", "rating": "up"}, "expected a list"),
    ({"messages": [], "reply": "x", "rating": "up"}, "conversation before the rated reply is empty"),
    ({"messages": Q2 + [{"role": "assistant", "content": "Paris"}], "reply": "x", "rating": "up"},
     "ends with role 'assistant'"),
    ({"messages": [{"role": "system", "content": "Be brief."}], "reply": "x", "rating": "up"},
     "ends with role 'system'"),
    ({"messages": Q2, "reply": "x", "rating": "up", "finish_reason": "timeout"}, "finish_reason"),
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
    assert "left out nothing" in stdout
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


def test_unfinished_replies_are_never_exported_as_approved(tmp_path):
    """Cut at max_tokens (from the server's log or said by the client) or stopped by the user: Good is not enough;
    a better answer on the same reply is kept."""
    store = FeedbackStore(tmp_path)
    cut = store.add_exchange(Q2, "The capital of France is", finish_reason="length")
    store.add_feedback(completion_id=cut, rating="up")
    store.add_feedback(messages=Q3, reply="Hel", rating="up", finish_reason="stopped")
    # the client claims "stop" for the logged cut reply: the server's log wins
    cut2 = store.add_exchange(Q1, "The answer is", finish_reason="length")
    store.add_feedback(completion_id=cut2, messages=Q1, reply="The answer is", rating="up", finish_reason="stop")
    fixed = store.add_exchange([{"role": "user", "content": "Name a colour."}], "Blu", finish_reason="length")
    store.add_feedback(completion_id=fixed, correction="Blue.")
    rows, stats = training_rows(store.feedback())
    assert rows == [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}]
    assert stats == {"approved": 0, "corrected": 1, "left_out": {"cut_at_max_tokens": 2, "stopped_by_user": 1}}
    store.close()


def bad_then_good(store: FeedbackStore) -> None:
    """A conversation whose first reply is rated Bad; the user goes on and rates the second reply Good."""
    first = [{"role": "user", "content": "What is the capital of France?"}]
    bad = store.add_exchange(first, "Lyon, the city of silk weavers.")
    store.add_feedback(completion_id=bad, rating="down")
    later = first + [{"role": "assistant", "content": "Lyon, the city of silk weavers."},
                     {"role": "user", "content": "Are you sure? Think again."}]
    good = store.add_exchange(later, "Sorry: Paris is the capital of France.")
    store.add_feedback(completion_id=good, rating="up")
    single = store.add_exchange([{"role": "user", "content": "Name a primary colour."}], "Red.")
    store.add_feedback(completion_id=single, rating="up")
    wrong = store.add_exchange([{"role": "user", "content": "How many legs does a spider have?"}], "Six.")
    store.add_feedback(completion_id=wrong, rating="down")
    store.add_feedback(completion_id=wrong, correction="A spider has eight legs.")


def test_a_bad_reply_inside_a_later_conversation_is_never_trained(tmp_path):
    store = FeedbackStore(tmp_path)
    bad_then_good(store)
    # train_on assistant trains every assistant turn: the conversation holding the Bad reply cannot be exported
    rows, stats = training_rows(store.feedback(), train_on="assistant")
    assert all("Lyon" not in m["content"] for r in rows for m in r["messages"])
    assert stats["left_out"] == {"rated_bad": 1, "unapproved_context": 1} and len(rows) == 2
    # train_on last_assistant: earlier turns are context only, the row is kept with its approved last reply
    rows, stats = training_rows(store.feedback(), train_on="last_assistant")
    assert len(rows) == 3 and stats["left_out"] == {"rated_bad": 1}
    assert [r["messages"][-1]["content"] for r in rows if len(r["messages"]) > 2] == [
        "Sorry: Paris is the capital of France."]
    store.close()


def test_an_approved_earlier_reply_may_stay_in_context_under_train_on_assistant(tmp_path):
    store = FeedbackStore(tmp_path)
    a = store.add_exchange(Q2, "Paris.")
    store.add_feedback(completion_id=a, rating="up")
    b = store.add_exchange(Q2 + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}],
                           "Madrid.")
    store.add_feedback(completion_id=b, rating="up")
    rows, stats = training_rows(store.feedback(), train_on="assistant")
    assert len(rows) == 2 and stats == {"approved": 2, "corrected": 0, "left_out": {}}
    store.close()


def test_rows_prepare_would_drop_are_left_out_with_prepares_reason(tmp_path):
    """Old stores may hold rows the server now refuses: the export still only writes rows prepare keeps."""
    store = FeedbackStore(tmp_path)
    with store._lock:  # written as an older version of the server did, without today's checks
        for messages, reply in (([{"role": "system", "content": "S"}], "no user turn"),
                                (Q2 + [{"role": "assistant", "content": "x"}], "after an assistant turn"),
                                (Q3, "   ")):
            store._db.execute("INSERT INTO feedback (created, messages, reply, rating) VALUES (0, ?, ?, 'up')",
                              (json.dumps(messages), reply))
    rows, stats = training_rows(store.feedback(), train_on="last_assistant")
    assert rows == []
    assert stats["left_out"] == {"no_user_turn": 1, "context_not_ending_with_user": 1, "empty_turn": 1}
    store.close()


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_export_round_trip_through_prepare_never_trains_a_bad_reply(tmp_path, cli, tiny_model_dir, train_on):
    """Export -> prepare (the real stage, the embedded model's tokenizer): every exported row is kept, the
    approved and corrected replies get loss, the Bad reply never does."""
    import datasets
    import yaml
    from transformers import AutoTokenizer

    from finetune import prepare as prepare_mod
    from finetune import recipe as recipe_mod
    from finetune.data.render import IGNORE_INDEX

    store = FeedbackStore(tmp_path / "store")
    bad_then_good(store)
    store.close()
    before = (tmp_path / "store" / STORE_FILE).read_bytes()
    out = tmp_path / "feedback.jsonl"
    code, stdout, _ = cli("feedback", "export", str(tmp_path / "store"), "-o", str(out), "--train-on", train_on)
    assert code == 0, stdout
    assert "1 rated Bad without a better answer" in stdout
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "fb", "runs_dir": str(tmp_path / "runs"), "model": {"id": str(tiny_model_dir)},
        "data": {"sources": [{"path": str(out)}], "train_on": train_on, "split": {"validation": 0, "test": 0}}}))
    report = prepare_mod.run(recipe_mod.load(recipe_path))
    assert report["splits"]["train"] == len(exported) and not report["dropped"], report
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = datasets.load_from_disk(str(tmp_path / "runs" / "fb" / "prepare" / "tokenized" / "train"))
    trained = [tok.decode([i for i, label in zip(r["input_ids"], r["labels"], strict=True) if label != IGNORE_INDEX])
               for r in ds]
    everything = " ".join(trained)
    assert "Lyon" not in everything
    assert "Red." in everything and "A spider has eight legs." in everything
    assert ("Paris is the capital" in everything) == (train_on == "last_assistant")
    assert (tmp_path / "store" / STORE_FILE).read_bytes() == before


def test_preference_rows_pairs_from_corrections_and_kto_rows_from_ratings(tmp_path):
    from finetune.data.feedback import preference_rows

    store = FeedbackStore(tmp_path)
    a = store.add_exchange(Q1, "4")
    b = store.add_exchange(Q2, "Lyon")
    c = store.add_exchange(Q3, "Go away.")
    d = store.add_exchange(Q3, "Hel", finish_reason="length")
    e = store.add_exchange(Q2, "Paris")
    store.add_feedback(completion_id=a, rating="up")
    store.add_feedback(completion_id=b, rating="down")
    store.add_feedback(completion_id=b, correction="Paris.")
    store.add_feedback(completion_id=c, rating="down")
    store.add_feedback(completion_id=d, rating="up")          # cut at max_tokens: not desirable
    store.add_feedback(completion_id=e, correction="Paris")   # the same answer: nothing to prefer
    pairs, rated, stats = preference_rows(store.feedback())
    store.close()
    reply = [{"role": "assistant", "content": "Lyon"}]
    assert pairs == [{"prompt": Q2, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": reply}]
    labels = {(r["prompt"][-1]["content"], r["completion"][0]["content"]): r["label"] for r in rated}
    assert labels == {("2+2?", "4"): True, ("Capital of France?", "Paris."): True,
                      ("Capital of France?", "Lyon"): False, ("Say hi.", "Go away."): False}
    assert stats == {"pairs": 1, "desirable": 2, "undesirable": 2,
                     "left_out": {"cut_at_max_tokens": 1, "identical_pair": 1}}


def test_export_as_preferences_round_trips_through_prepare(tmp_path, cli, tiny_model_dir):
    """--as preferences -> prepare: the pairs file is read as pairs, the KTO file as rated rows; the rejected
    and undesirable replies are never SFT targets."""
    import datasets
    import yaml
    from transformers import AutoTokenizer

    from finetune import prepare as prepare_mod
    from finetune import recipe as recipe_mod
    from finetune.training import rows as split_rows

    store = FeedbackStore(tmp_path / "store")
    store.add_feedback(messages=Q2, reply="Lyon", correction="Paris.")
    store.add_feedback(messages=Q3, reply="Go away.", correction="Hello!")
    store.add_feedback(messages=Q1, reply="4", rating="up")
    store.close()
    out = tmp_path / "prefs.jsonl"
    code, stdout, _ = cli("feedback", "export", str(tmp_path / "store"), "-o", str(out), "--as", "preferences")
    assert code == 0, stdout
    assert "wrote 2 pairs" in stdout and "5 rated rows (3 desirable, 2 undesirable)" in stdout
    assert (tmp_path / "prefs.kto.jsonl").exists()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, path, kind in (("pairs", out, "pairs"), ("kto", tmp_path / "prefs.kto.jsonl", "rated")):
        recipe_path = tmp_path / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump({
            "name": name, "runs_dir": str(tmp_path / "runs"), "model": {"id": str(tiny_model_dir)},
            "data": {"sources": [{"path": str(path)}], "split": {"validation": 0, "test": 0}},
            "train": {"max_steps": 1, "batch_size": 8}}))
        recipe = recipe_mod.load(recipe_path)
        report = prepare_mod.run(recipe)
        assert report["row_kind"] == kind and not report["dropped"], report
        ds = datasets.load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / "train"))
        keep = ds["desirable"] if kind == "rated" else [1] * len(ds)
        sft_targets = " ".join(tok.decode([i for i, lab in zip(r["input_ids"], r["labels"], strict=True)
                                           if lab != -100]) for r, good in zip(ds, keep, strict=True) if good)
        assert "Lyon" not in sft_targets and "Go away" not in sft_targets and "Paris." in sft_targets
        sft_rows = split_rows.load_sft_rows(recipe.run_dir("prepare") / "tokenized" / "train", "train")  # SFT's view
        assert "Lyon" not in " ".join(tok.decode([t for t in lab if t != -100]) for _, lab in sft_rows)


def test_the_server_imports_the_store_alone():
    """serve records feedback; the rows and the `finetune feedback` command are not loaded with it."""
    import subprocess
    import sys

    code = ("import sys, serve.app, serve.server\n"
            "print(sorted(m for m in sys.modules if m.startswith(('finetune.feedback', 'finetune.data.feedback'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['finetune.feedback_store']"
