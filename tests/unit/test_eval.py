"""The eval stage on a tiny model: same prompts for base and fine-tuned, batched generation, loss, outputs, verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from eval_fixtures import arithmetic_rows, make_recipe, write_prepared

from finetune import eval_models, verdict
from finetune import evaluate as ft_eval
from finetune.data.render import prompt_text
from finetune.run import artifacts, runs


def _write_trained(recipe, model_dir, log_rows):
    """runs/<name>/train/ per the train contract: a LoRA adapter (non-zero, so it changes the model) + log."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    with runs.StageRun(recipe, "train") as stage:
        adapter = stage.dir / "adapter"
        peft_model.save_pretrained(adapter)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(adapter)
        runs.atomic_write_text(stage.dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log_rows))
        stage.record(artifacts.Trained(method="lora", adapter=adapter, model=None, base_model=Path(model_dir),
                                       log=stage.dir / "log.jsonl", summary=stage.dir / "summary.json",
                                       tensorboard=stage.dir / "tb"))


def _log(train_losses, val_every=2, val_losses=None):
    rows = []
    vals = iter(val_losses or [])
    for step, loss in enumerate(train_losses, start=1):
        val = next(vals, None) if step % val_every == 0 else None
        rows.append({"step": step, "epoch": step / len(train_losses), "loss": loss, "val_loss": val, "lr": 1e-4,
                     "tokens": 100 * step, "tokens_per_s": 100.0, "time": float(step)})
    return rows


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    recipe = make_recipe(tmp, tiny_model_dir, eval={
        "metrics": ["loss", "perplexity", "exact_match", "accuracy", "f1", "rouge", "bleu", "chrf"],
        "max_examples": 6, "max_new_tokens": 6, "batch_size": 4,
    })
    write_prepared(recipe, tiny_model_dir, {"train": arithmetic_rows(10), "validation": arithmetic_rows(4, 10),
                                             "test": arithmetic_rows(8, 20)})
    _write_trained(recipe, tiny_model_dir, _log([3.0, 2.5, 2.0, 1.6, 1.3, 1.1, 1.0, 0.9], val_losses=[2.6, 2.0, 1.5, 1.3]))
    result = ft_eval.run(recipe)
    return recipe, result


def test_eval_writes_metrics_examples_report_and_manifest(evaluated):
    recipe, result = evaluated
    out = recipe.run_dir("eval")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "finetuned"}
    assert metrics["examples"] == 6  # eval.max_examples of the 8 test rows
    for name in ("base", "finetuned"):
        entry = metrics["models"][name]
        for key in ("loss", "perplexity", "exact_match", "accuracy", "f1", "rouge1", "rougeL", "bleu", "chrf"):
            assert key in entry, (name, key)
        assert entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
        assert 0 <= entry["exact_match"] <= 1
    # the adapter changes the model: its held-out loss differs from the base model's
    assert metrics["models"]["base"]["loss"] != metrics["models"]["finetuned"]["loss"]
    assert metrics["gguf"]["status"] == "absent" and "export has not run" in metrics["gguf"]["reason"]

    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert row["prompt"].endswith("<|im_start|>assistant\n")  # chat template + generation prompt
        assert "plus" in row["prompt"] and row["messages"][-1]["role"] == "user"
        assert set(row["answers"]) == {"base", "finetuned"} and set(row["scores"]) == {"base", "finetuned"}
    assert [r["reference"] for r in rows] == [r["messages"][-1]["content"] for r in arithmetic_rows(6, 20)]

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # loss curves and the metric chart, embedded
    assert "export has not run" in page
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert artifacts.from_folder(artifacts.Evaluated, out).variants == ["base", "finetuned"]


def test_exact_match_in_metrics_equals_examples(evaluated):
    recipe, result = evaluated
    rows = [json.loads(line) for line in (recipe.run_dir("eval") / "examples.jsonl").read_text().splitlines()]
    for name in ("base", "finetuned"):
        hits = sum(r["answers"][name].strip() == r["reference"].strip() for r in rows)
        assert result["models"][name]["exact_match"] == pytest.approx(hits / len(rows))


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # prompts of different lengths, so the batch really is padded
    prompts = [prompt_text(tok, r["messages"][:-1]) for r in arithmetic_rows(3)]
    prompts[1] = prompt_text(tok, [{"role": "user", "content": "A much longer question " * 6}])
    kwargs = dict(device="cpu", max_new_tokens=8, temperature=0.0, seed=0)
    batched = eval_models.generate(model, tok, prompts, batch_size=3, **kwargs)
    single = eval_models.generate(model, tok, prompts, batch_size=1, **kwargs)
    assert [b["text"] for b in batched] == [s["text"] for s in single]
    assert tok.padding_side == AutoTokenizer.from_pretrained(tiny_model_dir).padding_side  # restored


def test_dataset_loss_equals_the_models_own_loss(tiny_model_dir):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data import tokenized
    from finetune.data.render import render_messages

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rendered = [render_messages(tok, r["messages"]) for r in arithmetic_rows(3)]
    rendered[0] = render_messages(tok, [{"role": "user", "content": "longer " * 20}, {"role": "assistant", "content": "ok"}])
    ds = Dataset.from_dict({"input_ids": [i for i, _ in rendered], "labels": [lab for _, lab in rendered]})
    ours = eval_models.dataset_loss(model, tokenized.rows(ds), "cpu")  # as eval reads prepare's arrays
    nll, count = 0.0, 0
    for ids, labels in rendered:
        n = sum(1 for x in labels[1:] if x != -100)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        nll += float(loss) * n
        count += n
    assert ours["tokens"] == count
    assert ours["loss"] == pytest.approx(nll / count, rel=1e-4)


def test_overfitting_rule():
    # validation rises after step 4 while training loss keeps falling
    rows = _log([3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2], val_losses=[1.9, 1.5, 1.8, 2.2])
    assert verdict.overfitting(rows, {})["flag"] is True
    healthy = _log([3.0, 2.0, 1.5, 1.0, 0.9, 0.85, 0.8, 0.8], val_losses=[1.9, 1.5, 1.4, 1.4])
    assert verdict.overfitting(healthy, {})["flag"] is False
    # the generalisation-gap rule alone: held-out loss far above the loss on training examples
    assert verdict.overfitting(healthy, {"loss": 1.5, "train_sample_loss": 0.5})["flag"] is True
    assert verdict.overfitting(healthy, {"loss": 0.52, "train_sample_loss": 0.5})["flag"] is False


def test_underfitting_rule():
    flat_high = _log([3.0, 2.9, 2.9, 2.8, 2.8, 2.8], val_losses=[2.9, 2.8, 2.8])
    assert verdict.underfitting(flat_high)["flag"] is True  # still above 70% of the first loss
    still_falling = _log([3.0, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6, 0.45, 0.3], val_every=3, val_losses=[1.7, 1.1, 0.5])
    assert verdict.underfitting(still_falling)["flag"] is True
    converged = _log([3.0, 1.0, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], val_every=3, val_losses=[0.6, 0.5, 0.5])
    assert verdict.underfitting(converged)["flag"] is False


def test_verdict_uses_the_bootstrap_interval():
    base = [{"exact_match": 0.0}] * 30
    better = [{"exact_match": 1.0}] * 25 + [{"exact_match": 0.0}] * 5
    v = verdict.make_verdict({"base": {}, "finetuned": {}}, {"base": base, "finetuned": better}, {}, [],
                             ["exact_match"], {"status": "absent"})
    assert v["improved"]["status"] == "improved" and v["improved"]["ci95"][0] > 0
    assert v["improved"]["difference"] == pytest.approx(25 / 30)
    lo, hi = v["improved"]["wilson95"]["finetuned"]
    assert lo < 25 / 30 < hi
    noisy = [{"exact_match": 1.0}] * 1 + [{"exact_match": 0.0}] * 29
    v = verdict.make_verdict({"base": {}, "finetuned": {}}, {"base": base, "finetuned": noisy}, {}, [],
                             ["exact_match"], {"status": "absent"})
    assert v["improved"]["status"] == "no clear difference"


def test_eval_without_train_names_the_command(tiny_model_dir, tmp_path):
    from finetune.errors import UserError

    recipe = make_recipe(tmp_path, tiny_model_dir)
    write_prepared(recipe, tiny_model_dir, {"test": arithmetic_rows(2)})
    with pytest.raises(UserError, match="finetune train"):
        ft_eval.run(recipe)
