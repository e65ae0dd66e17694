"""The forgetting check (finetune.eval_forgetting), its verdict, its report section, and replay (data.mix.general) in
prepare, on the tiny random model with the embedded model's real tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import arithmetic_rows, make_recipe, write_prepared

from finetune import eval_forgetting as ef
from finetune import general, verdict
from finetune.run import artifacts, runs


def _small_sets(tmp: Path) -> tuple[Path, Path]:
    """Four of the shipped prompts and three of the shipped paragraphs: the check's code path at a tenth of the cost."""
    prompts, texts = tmp / "prompts.jsonl", tmp / "text.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in general.read_lines(general.PROMPTS, "prompt")[:4]))
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in general.read_lines(general.TEXT, "text")[:3]))
    return prompts, texts


def _check(tokenizer, model_dir: Path, tmp: Path, cache_from: Path | None, cache_to: Path) -> ef.ForgettingCheck:
    prompts, texts = _small_sets(tmp)
    return ef.ForgettingCheck(tokenizer, base_dir=model_dir, device="cpu", reasoning="auto", cache_from=cache_from,
                              cache_to=cache_to, batch_size=4, prompts_file=prompts, text_file=texts)


def _lora(model, seed: int = 1):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model with a random LoRA merged in: its greedy answers are words (the bare tiny model only
    writes newlines, which the generation reader strips to empty answers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("forgetting-base")
    merged = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), seed=1).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_shipped_sets_are_distinct_and_documented():
    prompts = general.read_lines(general.PROMPTS, "prompt")
    replay = general.read_lines(general.REPLAY_PROMPTS, "prompt")
    texts = general.read_lines(general.TEXT, "text")
    assert len(prompts) == 32 and len(replay) == 64 and len(texts) == 20
    assert not set(prompts) & set(replay)  # replay never trains on what the check measures
    assert "Apache-2.0" in (general.HERE / "SOURCE.md").read_text()


def test_compare_is_zero_for_the_same_model_and_matches_torch_kl():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(7, 50) * 3, dim=-1)
    tuned = torch.log_softmax(torch.randn(7, 50) * 3, dim=-1)
    kl, top = ef.compare(base.half(), base.argmax(-1), base)
    assert float(kl.abs().max()) == 0.0 and bool(top.all())
    kl, top = ef.compare(base.half(), base.argmax(-1), tuned)
    expected = F.kl_div(tuned, base, log_target=True, reduction="none").sum(-1)  # KL(base || tuned) per position
    assert torch.allclose(kl, expected, atol=5e-3)
    assert top.tolist() == (tuned.argmax(-1) == base.argmax(-1)).tolist()


def test_forgetting_verdict_thresholds():
    def measures(agree, kl, ppl_ratio):
        return {"top1_agreement": agree, "kl": kl, "perplexity": {"base": 10.0, "finetuned": 10.0 * ppl_ratio}}

    assert verdict.forgetting(measures(0.95, 0.05, 1.02))["status"] == "none"
    assert verdict.forgetting(measures(0.85, 0.05, 1.02))["status"] == "mild"
    assert verdict.forgetting(measures(0.95, 0.2, 1.02))["status"] == "mild"
    assert verdict.forgetting(measures(0.95, 0.05, 1.10))["status"] == "mild"
    assert verdict.forgetting(measures(0.70, 0.05, 1.02))["status"] == "strong"
    assert verdict.forgetting(measures(0.95, 0.6, 1.02))["status"] == "strong"
    found = verdict.forgetting(measures(0.95, 0.05, 1.30))
    assert found["status"] == "strong" and "x1.300" in found["summary"] and found["rule"].startswith("Forgetting is")


def test_check_on_loaded_models_and_its_cache(base_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model_dir = base_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    first = tmp_path / "first"
    first.mkdir()
    same = _check(tok, tiny_model_dir, tmp_path, None, first)
    same.observe("base", model)
    same.observe("finetuned", model)  # the base compared with itself
    found = same.result()
    assert found["kl"] == 0.0 and found["top1_agreement"] == 1.0 and not found["answers_cached"]
    assert found["prompts"] == 4 and found["answer_tokens"] > 0 and found["paragraphs"] == 3
    assert found["perplexity"]["base"] == pytest.approx(found["perplexity"]["finetuned"], rel=1e-6)
    assert verdict.forgetting(found)["status"] == "none"
    stored = json.loads((first / ef.CACHE_NAME).read_text())
    assert len(stored["answers"]) == 4 and all(a["finish_reason"] in ("stop", "length") for a in stored["answers"])

    second = tmp_path / "second"
    second.mkdir()
    tuned = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), seed=2).eval()
    check = _check(tok, tiny_model_dir, tmp_path, first, second)
    with tuned.disable_adapter():
        check.observe("base", tuned)
    check.observe("finetuned", tuned)
    changed = check.result()
    assert changed["answers_cached"]  # read from the first folder (same base, prompts, template)
    assert changed["kl"] > 0 and changed["top1_agreement"] < 1.0
    assert changed["perplexity"]["finetuned"] != changed["perplexity"]["base"]
    assert [p["prompt"] for p in changed["per_prompt"]] == [p["prompt"] for p in found["per_prompt"]]

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "What is a cloud?"}) + "\n")
    other = ef.ForgettingCheck(tok, base_dir=tiny_model_dir, device="cpu", reasoning="auto", cache_from=first,
                               cache_to=second, prompts_file=tmp_path / "prompts.jsonl",
                               text_file=tmp_path / "text.jsonl")
    other.observe("base", model)
    other.observe("finetuned", model)
    assert not other.result()["answers_cached"]  # other prompts: generated again


def _write_trained(recipe, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model = _lora(AutoModelForCausalLM.from_pretrained(model_dir), seed=2)
    with runs.StageRun(recipe, "train") as stage:
        peft_model.save_pretrained(stage.dir / "adapter")
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(stage.dir / "adapter")
        runs.atomic_write_text(stage.dir / "log.jsonl", "")
        stage.record(artifacts.Trained(method="lora", adapter=stage.dir / "adapter", model=None,
                                       base_model=Path(model_dir), log=stage.dir / "log.jsonl",
                                       summary=stage.dir / "summary.json", tensorboard=stage.dir / "tb"))


def test_eval_writes_the_forgetting_verdict_and_report_section(base_dir, tmp_path, monkeypatch):
    from finetune import evaluate

    monkeypatch.setattr(ef, "ANSWER_TOKENS", 12)  # the shipped prompts and text, shorter answers

    tiny_model_dir = base_dir

    recipe = make_recipe(tmp_path, tiny_model_dir, eval={"metrics": ["exact_match"], "max_examples": 2,
                                                         "max_new_tokens": 2, "gguf": False})
    write_prepared(recipe, tiny_model_dir, {"train": arithmetic_rows(4), "validation": arithmetic_rows(2, 4),
                                            "test": arithmetic_rows(2, 8)})
    _write_trained(recipe, tiny_model_dir)
    result = evaluate.run(recipe)
    found = result["verdict"]["forgetting"]
    assert found["status"] in ("none", "mild", "strong") and found["summary"].startswith("Forgetting: ")
    assert result["forgetting"]["prompts"] == 32 and result["forgetting"]["paragraphs"] == 20
    assert "forgetting" in result["rules"]
    out = recipe.run_dir("eval")
    assert json.loads((out / "metrics.json").read_text())["verdict"]["forgetting"]["status"] == found["status"]
    page = (out / "report.html").read_text()
    assert "What fine-tuning cost: forgetting" in page and found["summary"].split(" (")[0] in page
    assert (out / "forgetting.png").stat().st_size > 1000 and (out / ef.CACHE_NAME).is_file()


# ------------------------------------------------------------------------------------------------ replay
def _rows(n: int) -> list:
    from finetune.data.example import Example

    return [Example({"messages": []}, f"o{i}", -1, "train", "", key=f"k{i}") for i in range(n)]


def test_replay_pick_is_seeded_and_uses_every_row_before_repeating():
    from finetune.data import replay

    rows = _rows(5)
    assert replay.pick(rows, 0.1, 20, seed=3) == replay.pick(rows, 0.1, 20, seed=3)
    assert len(replay.pick(rows, 0.1, 20, seed=3)) == 2 and replay.pick(rows, 0.0, 20, seed=3) == []
    twelve = replay.pick(rows, 0.6, 20, seed=3)
    assert len(twelve) == 12 and {e.key for e in twelve[:5]} == {e.key for e in rows}
    assert [e.key for e in replay.pick(rows, 1.0, 20, seed=4)] != [e.key for e in replay.pick(rows, 1.0, 20, seed=3)]


def test_replay_generates_with_the_base_model_and_leaves_out_cut_answers(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data import replay

    monkeypatch.setattr(replay, "REPLAY_TOKENS", 8)  # 64 answers of 8 tokens: the same code path, a sixteenth of the cost

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    loads = []

    def load():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    rows, info = replay.conversations(tiny_model_dir, tok, load_model=load, device="cpu", reasoning="auto",
                                      cache_from=None, cache_to=tmp_path, seed=0)
    stored = json.loads((tmp_path / replay.CACHE_NAME).read_text())["answers"]
    assert len(stored) == 64 and loads == [1] and not info["answers_cached"]
    finished = [a for a in stored if a["finish_reason"] == "stop" and a["answer"].strip()]
    assert len(rows) == len(finished) and info["answers_cut"] == 64 - len(finished)
    again, info = replay.conversations(tiny_model_dir, tok, load_model=load, device="cpu", reasoning="auto",
                                       cache_from=tmp_path, cache_to=tmp_path, seed=0)
    assert loads == [1] and info["answers_cached"]  # the cache answered: the model was not loaded again


def test_prepare_blends_replay_rows_into_training_only(tiny_model_dir, tmp_path):
    """The base model's answers come from the cache prepare keeps (the tiny random model never ends an answer)."""
    import yaml
    from transformers import AutoTokenizer

    from finetune import prepare
    from finetune import recipe as recipe_mod
    from finetune.data import replay

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in arithmetic_rows(30)))
    doc = {"name": "mix", "seed": 1, "runs_dir": str(tmp_path / "runs"), "model": {"id": str(tiny_model_dir)},
           "data": {"sources": [{"path": str(data)}], "split": {"validation": 0.2, "test": 0.2},
                    "clean": {"near_dedupe": False}, "mix": {"general": 0.5}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    recipe = recipe_mod.load(tmp_path / "recipe.yaml")
    prompts = general.read_lines(general.REPLAY_PROMPTS, "prompt")
    key = general.answers_key(tiny_model_dir, prompts, template=AutoTokenizer.from_pretrained(tiny_model_dir).chat_template,
                              max_new_tokens=replay.REPLAY_TOKENS, reasoning="auto")
    answers = [{"prompt": p, "rendered": "", "answer": f"A short answer {i}.", "raw": "", "finish_reason": "stop"}
               for i, p in enumerate(prompts)]
    general.write_answers(recipe.run_dir("prepare") / replay.CACHE_NAME, key, answers)

    report = prepare.run(recipe)
    mix = report["mix"]
    assert mix["answers_cached"] and mix["usable"] == 64 and mix["rows_added"] == round(0.5 * mix["task_train_rows"])
    splits = {s: [json.loads(x) for x in (recipe.run_dir("prepare") / "splits" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation", "test")}
    replayed = [r for r in splits["train"] if "replay_prompts.jsonl" in r["origin"]]
    assert len(replayed) == mix["rows_added"] > 0 and report["splits"]["train"] == mix["task_train_rows"] + len(replayed)
    assert replayed[0]["messages"][1]["content"].startswith("A short answer")
    assert not any("replay_prompts.jsonl" in r["origin"] for s in ("validation", "test") for r in splits[s])
    assert runs.read_manifest(recipe.run_dir("prepare"))["mix"]["rows_added"] == mix["rows_added"]
    first = [r["id"] for r in splits["train"]]
    prepare.run(recipe, force=True)  # the same inputs give the same training split
    again = (recipe.run_dir("prepare") / "splits" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in again] == first
