"""The local metrics against the libraries they stand for (scikit-learn, sacrebleu, rouge-score) called directly,
and against values worked out by hand on tiny inputs; the Hub's metric modules only when asked for."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import sklearn.metrics
from rouge_score import rouge_scorer

from finetune import metrics, verdict
from finetune.metrics import local

PREDS = ["the cat sat on the mat", "a b c d e", "Paris is the capital.", "reset the router, then wait"]
REFS = ["the cat lay on the mat", "a b c d e", "The capital is Paris", "unplug the router and wait a minute"]
LABELS_TRUE = [0, 1, 0, 0, 2, 2, 1]
LABELS_PRED = [0, 1, 1, 0, -1, 2, 2]  # -1: an answer that is no reference class


def test_load_gives_the_local_metric_by_default():
    for name in metrics.LOCAL_METRICS:
        compute, source = metrics.load(name)
        assert compute is local.METRICS[name]
        assert source == f"local:finetune.metrics.local.{name}"
    with pytest.raises(ValueError, match="unknown metric 'bleurt'"):
        metrics.load("bleurt")


def test_the_hub_is_asked_only_when_wanted(monkeypatch, capsys):
    """Online, the default still scores locally; prefer_hub asks the Hub, and a failed load scores locally and says
    so. The Hub is unreachable from the tests, so a recording stand-in answers for evaluate.load."""
    import evaluate as hf_evaluate

    asked = []

    def unreachable_hub(path, *args, **kwargs):
        asked.append(path)
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(hf_evaluate, "load", unreachable_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "0")
    monkeypatch.setattr(metrics, "_hub_unreachable", False)
    _, _, sources = metrics.score_generations(["exact_match", "bleu"], PREDS, REFS)
    assert asked == [] and set(sources.values()) == {"local:finetune.metrics.local.exact_match",
                                                    "local:finetune.metrics.local.bleu"}
    _, _, sources = metrics.score_generations(["exact_match", "bleu"], PREDS, REFS, prefer_hub=True)
    assert asked == ["evaluate-metric/exact_match"]  # one failure: the rest of the process stays local
    assert all(s.startswith("local:") for s in sources.values())
    assert "evaluate-metric/exact_match could not be loaded (ConnectionError" in capsys.readouterr().out


def test_exact_match():
    assert local.exact_match(predictions=["a", "B", "c!"], references=["a", "b", "c"]) == {"exact_match": 1 / 3}
    assert local.exact_match(predictions=[], references=[]) == {"exact_match": 0.0}
    with pytest.raises(ValueError):
        local.exact_match(predictions=["a"], references=["a", "b"])


@pytest.mark.parametrize("name", ["accuracy", "precision", "recall", "f1"])
def test_label_metrics_are_scikit_learn(name):
    score = getattr(sklearn.metrics, f"{name}_score")
    kwargs = {} if name == "accuracy" else {"average": "macro", "labels": [0, 1, 2], "zero_division": 0}
    out = local.METRICS[name](predictions=LABELS_PRED, references=LABELS_TRUE, **kwargs)
    assert out == {name: float(score(LABELS_TRUE, LABELS_PRED, **kwargs))}


def test_label_metrics_by_hand():
    preds, refs = [0, 1, 1, 0], [0, 1, 0, 0]
    assert local.METRICS["accuracy"](predictions=preds, references=refs)["accuracy"] == 0.75
    # class 1: predicted twice, right once -> precision 1/2; one true positive of one -> recall 1
    assert local.METRICS["precision"](predictions=preds, references=refs)["precision"] == 0.5
    assert local.METRICS["recall"](predictions=preds, references=refs)["recall"] == 1.0
    assert local.METRICS["f1"](predictions=preds, references=refs)["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    # macro: class 0 precision 2/2, recall 2/3 -> f1 0.8; class 1 f1 2/3 -> mean 0.7333
    macro = local.METRICS["f1"](predictions=preds, references=refs, average="macro")["f1"]
    assert macro == pytest.approx((0.8 + 2 / 3) / 2)


def test_rouge_is_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    direct = [scorer.score(r, p) for p, r in zip(PREDS, REFS, strict=True)]
    per = local.rouge(predictions=PREDS, references=REFS, use_aggregator=False)
    assert per == {t: [d[t].fmeasure for d in direct] for t in per} and len(per) == 4
    mean = local.rouge(predictions=PREDS, references=REFS)
    assert mean == {t: pytest.approx(sum(v) / len(v), abs=1e-15) for t, v in per.items()}


def test_rouge_by_hand():
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    scores = local.rouge(predictions=[pred], references=[ref])
    assert scores["rouge1"] == pytest.approx(5 / 6)  # 5 of 6 words shared, both ways
    assert scores["rouge2"] == pytest.approx(3 / 5)  # the-cat, on-the, the-mat of 5 bigrams
    assert scores["rougeL"] == pytest.approx(5 / 6)  # LCS "the cat on the mat"
    assert local.rouge(predictions=[pred, ref], references=[ref, ref])["rouge1"] == pytest.approx((5 / 6 + 1) / 2)


def test_bleu_is_sacrebleu():
    direct = sacrebleu.corpus_bleu(PREDS, [REFS])
    out = local.bleu(predictions=PREDS, references=[[r] for r in REFS])
    assert out == {"bleu": direct.score / 100, "precisions": [p / 100 for p in direct.precisions],
                   "brevity_penalty": direct.bp, "length_ratio": direct.ratio,
                   "translation_length": direct.sys_len, "reference_length": direct.ref_len}
    two_refs = [[r, p] for p, r in zip(PREDS, REFS, strict=True)]
    direct_two = sacrebleu.corpus_bleu(PREDS, [REFS, PREDS])
    assert local.bleu(predictions=PREDS, references=two_refs)["bleu"] == direct_two.score / 100
    with pytest.raises(ValueError, match="same number of references"):
        local.bleu(predictions=PREDS[:2], references=[["x"], ["y", "z"]])


def test_bleu_by_hand():
    preds = ["the cat sat on the mat", "a b c d e"]
    refs = [["the cat lay on the mat"], ["a b c d e"]]
    out = local.bleu(predictions=preds, references=refs)
    # clipped n-gram matches over the corpus: 1-grams 10/11, 2-grams 7/9, 3-grams 4/7, 4-grams 2/5; equal lengths
    expected = [10 / 11, 7 / 9, 4 / 7, 2 / 5]
    assert out["precisions"] == pytest.approx(expected)
    assert out["brevity_penalty"] == 1.0
    assert out["bleu"] == pytest.approx(math.exp(sum(math.log(p) for p in expected) / 4))
    # a shorter candidate pays the brevity penalty exp(1 - 5/4) with all precisions 1
    short = local.bleu(predictions=["a b c d"], references=[["a b c d e"]])
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 5 / 4))


def test_chrf_is_sacrebleu():
    refs = [[r] for r in REFS]
    assert local.chrf(predictions=PREDS, references=refs)["score"] == sacrebleu.corpus_chrf(PREDS, [REFS]).score
    plus = local.chrf(predictions=PREDS, references=refs, word_order=2)
    assert plus == {"score": sacrebleu.corpus_chrf(PREDS, [REFS], word_order=2).score,
                    "char_order": 6, "word_order": 2, "beta": 2}


def test_chrf_by_hand():
    # char 1-grams: P = R = 1/2; char 2-grams: "ab" vs "ac" -> 0. Averaged over orders: P = R = 1/4 -> F = 25
    assert local.chrf(predictions=["ab"], references=[["ac"]], char_order=2)["score"] == pytest.approx(25.0)
    assert local.chrf(predictions=["ab"], references=[["ac"]], char_order=1, beta=1)["score"] == pytest.approx(50.0)
    assert local.chrf(predictions=["same text"], references=[["same text"]])["score"] == pytest.approx(100.0)


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
    trimmed = [p.strip() for p in preds]
    assert corpus["bleu"] == sacrebleu.corpus_bleu(trimmed, [refs]).score / 100
    assert corpus["chrf"] == sacrebleu.corpus_chrf(trimmed, [refs]).score
    assert sources == {m: f"local:finetune.metrics.local.{m}"
                       for m in ("exact_match", "accuracy", "f1", "rouge", "bleu", "chrf")}


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
