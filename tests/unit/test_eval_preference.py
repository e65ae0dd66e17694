"""eval's reading of a preference run's loss curve. The eval stage on preference data for real (prepare -> train
DPO / KTO -> eval on a tiny model): tests/integration/test_eval_preference_stages.py."""

from __future__ import annotations

from finetune import verdict


def test_a_saturating_preference_loss_is_not_underfitting():
    """DPO's loss goes to ~0 within a few steps and keeps halving there: not "still falling" (the shipped DPO run's
    log shape: 0.69 -> 0.002 -> 0.0000005), while a real fall at the end still is."""
    def log(train, val):
        rows = [{"step": i + 1, "loss": x, "val_loss": None} for i, x in enumerate(train)]
        rows += [{"step": s, "loss": None, "val_loss": v} for s, v in val]
        return rows

    saturated = log([0.69, 0.59, 0.2, 0.01, 0.002, 0.001, 0.0004, 0.0001, 1e-5, 5e-7], [(5, 0.002), (10, 6e-7)])
    assert verdict.underfitting(saturated)["flag"] is False
    falling = log([0.69, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.26, 0.22, 0.18], [(5, 0.45), (10, 0.2)])
    assert verdict.underfitting(falling)["flag"] is True
