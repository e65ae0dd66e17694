"""The verdict of a GRPO run speaks of its reward: improved from the held-out reward (base vs fine-tuned, as eval_reward
scores it), over- and underfitting from the training and held-out rewards of the train log, and no judgement read
from its loss (a policy-gradient surrogate)."""

from __future__ import annotations

import pytest

from finetune import verdict


def _log(rewards: list[float], val_rewards: list[float], *, val_every: int = 2) -> list[dict]:
    """A GRPO train log: each step's training row (surrogate loss, mean reward) and, every ``val_every`` steps, a
    validation row (val_loss is minus the held-out reward, as train logs it)."""
    rows, vals = [], iter(val_rewards)
    for step, reward in enumerate(rewards, start=1):
        # a surrogate loss that stays high and keeps falling: the loss rules would call this underfitting
        rows.append({"step": step, "loss": 0.9 - 0.01 * step, "val_loss": None, "reward": reward, "reward_std": 0.3})
        if step % val_every == 0 and (v := next(vals, None)) is not None:
            rows.append({"step": step, "loss": None, "val_loss": -v, "val_reward": v})
    return rows


def _scores(base: list[float], tuned: list[float], exact: list[float | None] | None = None):
    def rows(values, hit):
        return [{"reward": v, **({"exact_match": e} if e is not None else {})}
                for v, e in zip(values, hit or [None] * len(values), strict=True)]

    return {"base": rows(base, exact and [0.0 if e is not None else None for e in exact]),
            "finetuned": rows(tuned, exact)}


def _no_loss_words(v: dict) -> None:
    for key in ("summary",):
        assert "loss" not in v[key]
    for key in ("overfitting", "underfitting"):
        assert "loss" not in v[key]["finding"] and "loss" not in v[key]["rule"]
    assert "loss" not in v


def test_a_grpo_verdict_is_read_from_the_held_out_reward():
    base = [-0.5, -0.25, 0.0, -0.5] * 8
    tuned = [0.5, 0.75, 0.5, 1.0] * 8
    exact = [1.0 if k % 4 == 3 else None if k % 2 else 0.0 for k in range(32)]  # 24 of the 32 rows have a reference
    variants = {"base": {"reward": -0.3125, "loss": 2.0}, "finetuned": {"reward": 0.6875, "loss": 2.5,
                                                                         "train_sample_loss": 0.5}}
    log = _log([-0.4, -0.3, 0.1, 0.3, 0.5, 0.5, 0.5, 0.5], [0.4, 0.55, 0.55, 0.55])
    v = verdict.make_verdict(variants, _scores(base, tuned, exact), {"base": [2.0] * 32, "finetuned": [2.5] * 32},
                             log, ["exact_match"], {"status": "absent"})
    assert v["improved"]["metric"] == "reward" and v["improved"]["status"] == "improved"
    assert v["improved"]["difference"] == pytest.approx(1.0) and v["improved"]["n"] == 32
    assert v["summary"].startswith("Fine-tuning improved held-out reward: base -0.312 → fine-tuned 0.688")
    assert v["improved"]["rule"] == verdict.REWARD_RULES["improved"]
    # the task metric only where an example has a reference, beside the reward
    assert v["task"]["metric"] == "exact_match" and v["task"]["n"] == 24
    assert v["overfitting"]["flag"] is False and v["underfitting"]["flag"] is False
    assert "held-out reward at the end 0.550 is within 0.05 of its best 0.550" in v["overfitting"]["finding"]
    assert v["underfitting"]["finding"].startswith("no: training reward -0.350 → 0.500")
    _no_loss_words(v)
    # the same log judged by the loss rules would have flagged underfitting (the surrogate loss stays high)
    assert verdict.underfitting(log)["flag"] is True


def test_reward_overfitting_and_underfitting():
    # held-out reward falls from its best while the training reward keeps rising
    over = _log([0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0.3, 0.6, 0.4, 0.3])
    found = verdict.reward_overfitting(over)
    assert found["flag"] is True
    assert found["finding"] == ("yes: held-out reward fell from 0.600 (step 4) to 0.300 (step 8) while the "
                                "training reward kept rising")
    # both rewards still rising at the end: more steps would help
    rising = _log([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [0.1, 0.3, 0.5], val_every=3)
    found = verdict.reward_underfitting(rising)
    assert found["flag"] is True and "held-out reward still rising at the end (0.300 → 0.500)" in found["finding"]
    assert "More steps" in found["finding"]
    assert verdict.reward_underfitting(_log([0.1, 0.2], [0.1]))["finding"].startswith("unknown: only 2 training reward")
    assert verdict.reward_overfitting(_log([0.1, 0.2], [0.1]))["finding"] == (
        "no: only 1 held-out reward point(s) in the train log: too few to see a trend")


def test_a_grpo_run_without_scored_answers_is_not_judged_by_loss():
    """Train logged rewards, but eval did not score the answers: no verdict from the held-out loss either."""
    log = _log([0.1, 0.2, 0.3, 0.4], [0.2, 0.3])
    v = verdict.make_verdict({"base": {"loss": 2.0}, "finetuned": {"loss": 1.0}}, {},
                             {"base": [2.0, 2.0], "finetuned": [1.0, 1.0]}, log, [], {"status": "absent"})
    assert v["improved"]["status"] == "unknown" and v["improved"]["metric"] == "reward"
    _no_loss_words(v)


def test_the_gguf_is_compared_on_the_reward_and_the_rules_follow_the_run():
    scores = _scores([0.0] * 10, [1.0] * 10)
    scores["gguf-Q8_0"] = [{"reward": 1.0}] * 9 + [{"reward": 0.0}]
    v = verdict.make_verdict({"base": {"reward": 0.0}, "finetuned": {"reward": 1.0}, "gguf-Q8_0": {"reward": 0.9}},
                             scores, {}, [], [], {"status": "scored", "variant": "gguf-Q8_0"})
    assert v["gguf"]["metric"] == "reward" and v["gguf"]["gguf"] == pytest.approx(0.9)
    assert verdict.rules(reward_run=True)["underfitting"] == verdict.REWARD_RULES["underfitting"]
    assert verdict.rules()["underfitting"] == verdict.VERDICT_RULES["underfitting"]
    assert "forgetting" in verdict.rules(reward_run=True)
    # an SFT run keeps the loss rules
    sft = verdict.make_verdict({"base": {}, "finetuned": {}}, {"base": [{"exact_match": 0.0}] * 10,
                                                               "finetuned": [{"exact_match": 1.0}] * 10},
                               {}, _log_sft(), ["exact_match"], {"status": "absent"})
    assert sft["improved"]["metric"] == "exact_match" and "training loss" in sft["underfitting"]["finding"]


def _log_sft() -> list[dict]:
    return [{"step": s, "loss": 3.0 - 0.2 * s, "val_loss": None} for s in range(1, 9)]
