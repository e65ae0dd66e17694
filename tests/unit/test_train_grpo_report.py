"""The eval report of a GRPO run: its training curve is the reward (training and held-out, as train's log.jsonl
records them), not the policy-gradient surrogate loss and minus the reward."""

from __future__ import annotations

from eval_fixtures import result_and_examples

from finetune import eval_report as report


def _grpo_log() -> list[dict]:
    """train's log.jsonl of a GRPO run: per step the surrogate loss and the sampled completions' reward; per
    validation minus the held-out reward as val_loss, and the held-out reward."""
    log = []
    for step in range(1, 9):
        log.append({"step": step, "epoch": step / 8, "loss": 0.001 * step, "val_loss": None, "lr": 1e-3,
                    "tokens": step * 300, "tokens_per_s": 100.0, "time": step * 2.0, "reward": 0.2 + 0.05 * step,
                    "reward_std": 0.3, "reward/numeric_match": 0.1 * step})
        if step % 4 == 0:
            log.append({"step": step, "epoch": step / 8, "loss": None, "val_loss": -0.1 * step, "lr": 1e-3,
                        "tokens": step * 300, "tokens_per_s": None, "time": step * 2.0, "val_reward": 0.1 * step,
                        "val_reward/numeric_match": 0.1 * step})
    return log


def test_a_grpo_runs_report_plots_the_training_and_validation_reward(tmp_path, monkeypatch):
    result, examples, sft_log = result_and_examples()
    figures = []
    png = report._png

    def keep(plt, fig):
        figures.append((fig.axes[0].get_title(), fig.axes[0].get_ylabel(),
                        [line.get_label() for line in fig.axes[0].get_lines()],
                        [list(line.get_ydata()) for line in fig.axes[0].get_lines()]))
        return png(plt, fig)

    monkeypatch.setattr(report, "_png", keep)
    page = report.write_report(tmp_path, result, examples, _grpo_log(), title="grpo: evaluation").read_text()
    assert "Training and validation reward" in page and "Training and validation loss" not in page
    assert (tmp_path / "reward_curves.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "loss_curves.png").exists()
    title, ylabel, labels, values = figures[0]
    assert title == "Training and validation reward" and "reward" in ylabel and "loss" not in ylabel
    assert labels == ["training reward (sampled completions)", "validation reward (greedy, held out)"]
    assert values[0] == [0.2 + 0.05 * s for s in range(1, 9)] and values[1] == [0.4, 0.8]  # not loss, not -reward

    # any other run keeps its loss curves
    other = tmp_path / "sft"
    other.mkdir()
    figures.clear()
    page = report.write_report(other, result, examples, sft_log, title="sft: evaluation").read_text()
    assert "Training and validation loss" in page and "Training and validation reward" not in page
    assert (other / "loss_curves.png").exists() and not (other / "reward_curves.png").exists()
    assert figures[0][1] == "loss (nats / token)"  # the curve is drawn first, then the metrics chart


def test_a_grpo_log_without_rewards_says_so():
    result, examples, _ = result_and_examples()
    page = report.render_html(result, examples, title="t", loss_png=None, metrics_png=None, reward_curve=True)
    assert "No train log with rewards was found." in page
    assert not report.reward_log([{"step": 1, "loss": 1.0, "val_loss": None}])
    assert report.reward_curve_png([]) is None
