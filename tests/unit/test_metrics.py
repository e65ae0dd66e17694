"""Each local metric module against values worked out by hand on tiny inputs, loaded offline."""

from __future__ import annotations

import math
import os

import pytest

from finetune import metrics, verdict


@pytest.fixture(scope="module")
def load():
    # conftest sets HF_HUB_OFFLINE=1: these loads must succeed without the Hub.
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

    def _load(name):
        module, source = metrics.load(name)
        assert source.startswith("local:") and source.endswith(f"{name}/{name}.py")
        return module

    return _load


def test_every_metric_loads_offline_through_evaluate(load):
    import evaluate as hf_evaluate

    for name in metrics.LOCAL_METRICS:
        module = hf_evaluate.load(str(metrics.local_path(name)))
        assert isinstance(module, hf_evaluate.EvaluationModule), name


def test_exact_match(load):
    em = load("exact_match")
    preds, refs = ["a", "B", "c!"], ["a", "b", "c"]
    assert em.compute(predictions=preds, references=refs)["exact_match"] == pytest.approx(1 / 3)
    assert em.compute(predictions=preds, references=refs, ignore_case=True)["exact_match"] == pytest.approx(2 / 3)
    assert em.compute(predictions=preds, references=refs, ignore_case=True,
                      ignore_punctuation=True)["exact_match"] == 1.0
    assert em.compute(predictions=["x1", "y"], references=["x2", "y"], ignore_numbers=True)["exact_match"] == 1.0
    assert em.compute(predictions=["id: 7"], references=["7"], regexes_to_ignore=["id: "])["exact_match"] == 1.0


def test_accuracy_precision_recall_f1(load):
    preds, refs = [0, 1, 1, 0], [0, 1, 0, 0]
    assert load("accuracy").compute(predictions=preds, references=refs)["accuracy"] == 0.75
    # class 1: predicted twice, right once -> precision 1/2; one true positive of one -> recall 1
    assert load("precision").compute(predictions=preds, references=refs)["precision"] == 0.5
    assert load("recall").compute(predictions=preds, references=refs)["recall"] == 1.0
    assert load("f1").compute(predictions=preds, references=refs)["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    # macro: class 0 precision 2/2, recall 2/3 -> f1 0.8; class 1 f1 2/3 -> mean 0.7333
    macro = load("f1").compute(predictions=preds, references=refs, average="macro")["f1"]
    assert macro == pytest.approx((0.8 + 2 / 3) / 2)


def test_rouge(load):
    rouge = load("rouge")
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    scores = rouge.compute(predictions=[pred], references=[ref])
    assert scores["rouge1"] == pytest.approx(5 / 6)  # 5 of 6 words shared, both ways
    assert scores["rouge2"] == pytest.approx(3 / 5)  # the-cat, on-the, the-mat of 5 bigrams
    assert scores["rougeL"] == pytest.approx(5 / 6)  # LCS "the cat on the mat"
    per = rouge.compute(predictions=[pred, ref], references=[ref, ref], use_aggregator=False)
    assert per["rouge1"] == pytest.approx([5 / 6, 1.0])
    assert rouge.compute(predictions=[pred, ref], references=[ref, ref])["rouge1"] == pytest.approx((5 / 6 + 1) / 2)


def test_bleu(load):
    bleu = load("bleu")
    preds = ["the cat sat on the mat", "a b c d e"]
    refs = ["the cat lay on the mat", "a b c d e"]
    out = bleu.compute(predictions=preds, references=refs)
    # clipped n-gram matches over the corpus: 1-grams 10/11, 2-grams 7/9, 3-grams 4/7, 4-grams 2/5; equal lengths
    expected = [10 / 11, 7 / 9, 4 / 7, 2 / 5]
    assert out["precisions"] == pytest.approx(expected)
    assert out["brevity_penalty"] == 1.0
    assert out["bleu"] == pytest.approx(math.exp(sum(math.log(p) for p in expected) / 4))
    assert bleu.compute(predictions=["a b c d e"], references=[["a b c d e"]])["bleu"] == pytest.approx(1.0)
    # a shorter candidate pays the brevity penalty exp(1 - 5/4) with all precisions 1
    short = bleu.compute(predictions=["a b c d"], references=["a b c d e"])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 5 / 4))


def test_chrf(load):
    chrf = load("chrf")
    # char 1-grams: P = R = 1/2; char 2-grams: "ab" vs "ac" -> 0. Averaged over orders: P = R = 1/4 -> F = 25
    assert chrf.compute(predictions=["ab"], references=[["ac"]], char_order=2)["score"] == pytest.approx(25.0)
    assert chrf.compute(predictions=["ab"], references=["ac"], char_order=1, beta=1)["score"] == pytest.approx(50.0)
    assert chrf.compute(predictions=["same text"], references=[["same text"]])["score"] == pytest.approx(100.0)


def test_score_generations_aggregates_match_per_example():
    preds = [" yes", "No.", "maybe", "yes"]
    refs = ["yes", "no", "no", "yes"]
    corpus, per, sources = metrics.score_generations(
        ["exact_match", "accuracy", "f1", "rouge", "bleu", "chrf"], preds, refs
    )
    assert corpus["exact_match"] == 0.5  # " yes" is trimmed; "No." differs in case and punctuation
    assert [r["exact_match"] for r in per] == [1, 0, 0, 1]
    assert corpus["accuracy"] == 0.75  # as labels, "No." == "no"
    # classes no/yes: no -> P 1/1, R 1/2 -> F 2/3; yes -> P 1, R 1 -> 1; "maybe" is no class
    assert corpus["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert corpus["rougeL"] == pytest.approx(sum(r["rougeL"] for r in per) / 4)
    assert set(sources) == {"exact_match", "accuracy", "f1", "rouge", "bleu", "chrf"}
    assert all(s.startswith("local:") for s in sources.values())


def test_wilson_interval():
    low, high = verdict.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # textbook value for 0/10
    low, high = verdict.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def test_paired_bootstrap():
    a = [0.0] * 50
    b = [1.0] * 40 + [0.0] * 10
    out = verdict.paired_bootstrap(a, b, resamples=500)
    assert out["difference"] == pytest.approx(0.8)
    assert 0.6 < out["low"] < 0.8 < out["high"] < 0.95
    same = verdict.paired_bootstrap(b, b, resamples=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0
