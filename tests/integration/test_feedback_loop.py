"""The loop a user runs after the first model is out: serve it, chat with it, rate and correct its answers, export
that feedback as training data and train again. For real, through the CLI, on a tiny model so that it takes minutes:

1. `finetune run` trains the tiny random Llama of tests/conftest.py (full fine-tuning, until it answers a handful
   of questions and stops) and exports it to GGUF;
2. `finetune serve` serves that GGUF; the `openai` client asks it questions (every other one streamed, as the web
   page asks), and each answer gets feedback through POST /api/feedback by its completion id: thumbs up, thumbs
   down, or a better answer;
3. `finetune feedback export` writes the SFT rows (approved and corrected replies) and, with `--as preferences`,
   the DPO pairs (corrections) and the KTO rows (ratings);
4. round two trains on them: SFT with the feedback file added to the recipe's sources, DPO and KTO with the
   feedback files alone (train.objective), each from the first round's model. Prepare must have read every exported
   row, and training must have logged a finite loss;
5. the DPO round is exported to GGUF like the first, and on each corrected prompt both GGUFs that `finetune serve`
   would serve score the corrected reply against the reply the first model gave (summed log-probability through
   llama.cpp, on the prompt the server builds): the new one must prefer the corrections more often.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from finetune.run import artifacts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYSTEM = "Be brief."
FACTS = [("Capital of France?", "Paris."), ("What is 2+2?", "4"), ("Name a colour.", "Blue."),
         ("Capital of Italy?", "Rome."), ("Largest planet?", "Jupiter."), ("Opposite of hot?", "Cold.")]
# (question, what the user does with the served answer): the first round's model learned FACTS; the chat asks
# these, answered or not.
FEEDBACK = [("Capital of France?", "up", None), ("What is 2+2?", "up", None), ("Name a colour.", "down", None),
            ("Capital of Italy?", "down", "Rome is the capital of Italy."),
            ("Largest planet?", None, "Jupiter is the largest planet."),
            ("Opposite of hot?", "down", "Cold, the opposite of hot.")]
# the first round: full fine-tuning of a random tiny model, enough steps to memorise FACTS and to stop after them
FIRST = {"train": {"method": "full", "lr": 3e-3, "max_steps": 60, "batch_size": 6, "warmup_ratio": 0.0,
                   "scheduler": "constant", "eval_every": 1000, "save_every": 1000, "log_every": 10, "threads": 1},
         "export": {"quantizations": ["Q8_0"], "adapter_gguf": False, "ollama": False, "imatrix": False,
                    "table_examples": 0}}
# the second rounds: two LoRA steps, each on all of the round's rows (a batch larger than the data), at full lr
SECOND = {"method": "lora", "lr": 1e-3, "max_steps": 2, "batch_size": 16, "warmup_ratio": 0.0, "scheduler": "constant",
          "eval_every": 1000, "save_every": 1000, "log_every": 1, "threads": 1}
# the DPO round is one that moves the model: the first round memorised the short replies the corrections reject (each
# at about -0.1 summed log-probability, the corrections at about -60), so the log-ratio margin must grow past 60 for
# the corrections to win. At beta 0.1 (30 steps at lr 1e-2) the loss was down to 0.04 at a margin near 38 and the
# corrections still lost; at beta 0.01 it keeps pushing.
DPO_ROUND = {**SECOND, "lr": 3e-3, "max_steps": 60, "preference": {"beta": 0.01}}
# the loss of the first step, where the policy is still the first round's model (the reference)
START_LOSS = {"dpo": math.log(2), "kto": 0.5}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{' '.join(proc.args[2:])}:\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def write_recipe(folder: Path, name: str, model: str | Path, sources: list[str], train: dict, **sections) -> Path:
    recipe = {"name": name, "seed": 0, "runs_dir": str(folder / "runs"), "model": {"id": str(model), "dtype": "float32"},
              "data": {"sources": [{"path": s} for s in sources], "split": {"validation": 0, "test": 0},
                       "clean": {"near_dedupe": False, "max_tokens": 128}},
              "train": train, "eval": {"gguf": False, "forgetting": False}, **sections}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def trained_loss(run_dir: Path) -> list[float]:
    """The training loss of each logged step (validation entries carry none)."""
    return [e["loss"] for e in read_jsonl(run_dir / "train" / "log.jsonl") if e["loss"] is not None]


@pytest.fixture(scope="module")
def first_round(tiny_model_dir, tmp_path_factory, finetune):
    # FINETUNE_E2E_RUNS_DIR reuses a folder (stages already up to date are skipped, the checks still run)
    folder = Path(os.environ.get("FINETUNE_E2E_RUNS_DIR") or tmp_path_factory.mktemp("feedback-loop"))
    base = folder / "base"
    if not base.is_dir():
        shutil.copytree(tiny_model_dir, base)
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in FACTS]
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = write_recipe(folder, "first", base, ["facts.jsonl"], **FIRST)
    ok(finetune("run", str(recipe), "--no-answer", timeout=900))
    return folder, recipe


@pytest.fixture(scope="module")
def feedback(first_round, finetune):
    """Chat with the served first-round GGUF and give feedback on every answer; then export it both ways."""
    openai = pytest.importorskip("openai")
    from serve.launch import ServerProcess

    folder, recipe = first_round
    for old in (folder / "runs" / "first" / "serve").glob("feedback.sqlite3*"):  # a reused folder's earlier chat
        old.unlink()
    replies = {}
    with ServerProcess(recipe, ["serve.threads=1"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for i, (question, rating, correction) in enumerate(FEEDBACK):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            ask = dict(model="first-Q8_0", max_tokens=24, temperature=0, messages=messages)
            if i % 2:  # as the web page asks: streamed, rated by the id of its chunks
                chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
                cid = chunks[0].id
                replies[question] = ("".join(c.choices[0].delta.content or "" for c in chunks),
                                     chunks[-1].choices[0].finish_reason)
            else:
                r = client.chat.completions.create(**ask)
                cid = r.id
                replies[question] = (r.choices[0].message.content, r.choices[0].finish_reason)
            body = {"completion_id": cid, "rating": rating, "correction": correction}
            assert post(server.url + "/api/feedback", body)["stored"] is True
        with urllib.request.urlopen(server.url + "/api/feedback", timeout=10) as r:
            counts = json.loads(r.read())
    sft, pairs = folder / "feedback.jsonl", folder / "pairs.jsonl"
    ok(finetune("feedback", "export", str(recipe), "-o", str(sft), timeout=300))
    ok(finetune("feedback", "export", str(recipe), "-o", str(pairs), "--as", "preferences", timeout=300))
    return folder, recipe, replies, counts, sft, pairs, folder / "pairs.kto.jsonl"


def second_round(finetune, folder: Path, name: str, sources: list[str], objective: str,
                 train: dict = SECOND) -> tuple[Path, dict]:
    """Prepare and train a second round from the first round's model; returns the run folder and prepare's report."""
    model = artifacts.from_folder(artifacts.Trained, folder / "runs" / "first" / "train").model
    recipe = write_recipe(folder, name, model, sources, {**train, "objective": objective}, export=FIRST["export"])
    ok(finetune("prepare", str(recipe), timeout=600))
    ok(finetune("train", str(recipe), timeout=600))
    run_dir = folder / "runs" / name
    return run_dir, json.loads((run_dir / "prepare" / "report.json").read_text())


def assert_trained(run_dir: Path, objective: str, steps: int = SECOND["max_steps"]) -> None:
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["tokens_seen"] > 0
    losses = trained_loss(run_dir)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    if objective in START_LOSS:
        assert losses[0] == pytest.approx(START_LOSS[objective], abs=1e-5), losses
    assert losses[1] < losses[0] and losses[-1] < losses[0], losses  # the same rows, one step later and at the end
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["recipe"]["train"]["objective"] == objective
    assert (artifacts.from_folder(artifacts.Trained, run_dir / "train").adapter / "adapter_config.json").exists()


def test_chat_feedback_is_stored_and_exported(feedback):
    _, _, replies, counts, sft, pairs, kto = feedback
    # the first round learned to answer these and stop, so a thumbs up approves a finished answer
    assert {q: finish for q, (_, finish) in replies.items()} == {q: "stop" for q, *_ in FEEDBACK}, replies
    assert (counts["exchanges"], counts["up"], counts["down"], counts["corrections"]) == (6, 2, 3, 3)

    corrected = {q: c for q, _, c in FEEDBACK if c}
    approved = {q: replies[q][0] for q, rating, c in FEEDBACK if rating == "up" and not c}
    sft_rows = read_jsonl(sft)
    answers = {r["messages"][1]["content"]: r["messages"][-1]["content"] for r in sft_rows}
    assert answers == {**approved, **corrected}  # rated down without a better answer: left out
    assert all(r["messages"][0] == {"role": "system", "content": SYSTEM} for r in sft_rows)

    pair_rows = read_jsonl(pairs)
    assert {r["prompt"][-1]["content"]: (r["chosen"][0]["content"], r["rejected"][0]["content"])
            for r in pair_rows} == {q: (c, replies[q][0]) for q, c in corrected.items()}
    rated = read_jsonl(kto)
    desirable = sorted((r["prompt"][-1]["content"], r["completion"][0]["content"]) for r in rated if r["label"])
    undesirable = sorted((r["prompt"][-1]["content"], r["completion"][0]["content"]) for r in rated if not r["label"])
    assert desirable == sorted({**approved, **corrected}.items())
    assert undesirable == sorted((q, replies[q][0]) for q, rating, c in FEEDBACK if c or rating == "down")


def test_second_round_sft_trains_on_the_feedback_rows(feedback, finetune):
    folder, _, _, _, sft, _, _ = feedback
    run_dir, report = second_round(finetune, folder, "again-sft", ["facts.jsonl", sft.name], "sft")
    exported = len(read_jsonl(sft))
    assert [(s["name"], s["rows_in"]) for s in report["sources"]] == [("facts.jsonl", 6), (sft.name, exported)]
    # the approved answers repeat the first round's data word for word: dedupe keeps one of each
    assert report["dropped"] == {"exact_duplicate": 2}
    assert report["splits"]["train"] == 6 + exported - 2
    assert_trained(run_dir, "sft")


@pytest.fixture(scope="module")
def dpo_round(feedback, finetune):
    folder, *_, pairs, _ = feedback
    return second_round(finetune, folder, "again-dpo", [pairs.name], "dpo", DPO_ROUND)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_second_round_preference_training_on_the_feedback(feedback, finetune, request, objective):
    folder, _, _, _, _, pairs, kto = feedback
    data = pairs if objective == "dpo" else kto
    if objective == "dpo":
        run_dir, report = request.getfixturevalue("dpo_round")
    else:
        run_dir, report = second_round(finetune, folder, f"again-{objective}", [data.name], objective)
    rows = len(read_jsonl(data))
    assert [(s["name"], s["rows_in"]) for s in report["sources"]] == [(data.name, rows)]
    assert report["dropped_total"] == 0 and report["splits"]["train"] == rows
    assert report["row_kind"] == ("pairs" if objective == "dpo" else "rated"), report["row_kind"]
    assert_trained(run_dir, objective, DPO_ROUND["max_steps"] if objective == "dpo" else SECOND["max_steps"])


def prefers_chosen(recipe: Path, pairs: list[dict]) -> list[bool]:
    """For each pair, whether the GGUF `finetune serve RECIPE` serves gives its chosen reply a higher summed
    log-probability than its rejected one, on the prompt the server builds."""
    from finetune.gguf import runtime
    from finetune.serve_target import resolve_target

    gguf = resolve_target(str(recipe)).gguf
    conversations = [p["prompt"] for p in pairs for _ in range(2)]
    replies = [m[0]["content"] for p in pairs for m in (p["chosen"], p["rejected"])]
    scores = [s["logprob"] for s in runtime.reply_logprobs(gguf, conversations, replies, threads=1)]
    return [chosen > rejected for chosen, rejected in zip(scores[::2], scores[1::2], strict=True)]


def test_one_dpo_round_makes_the_served_gguf_prefer_the_corrections(feedback, dpo_round, finetune):
    folder, first_recipe, _, _, _, pairs_file, _ = feedback
    ok(finetune("export", str(folder / "again-dpo.yaml"), timeout=600))
    pairs = read_jsonl(pairs_file)
    before = prefers_chosen(first_recipe, pairs)
    after = prefers_chosen(folder / "again-dpo.yaml", pairs)
    print(f"\nthe served GGUF prefers the corrected reply on {sum(before)} of {len(pairs)} prompts before, "
          f"{sum(after)} of {len(pairs)} after one DPO round")
    assert sum(after) > sum(before), (before, after)
