"""report.html is self-contained and shows its plots in a real headless browser (Debian's chromium via playwright)."""

from __future__ import annotations

import base64
import shutil

import pytest

from finetune import eval_report as report
from finetune import verdict as ft_verdict

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _result_and_examples():
    log = []
    for step in range(1, 41):
        val = 2.2 - 0.03 * step if step % 10 == 0 else None
        log.append({"step": step, "epoch": step / 20, "loss": 2.5 * 0.95 ** step + 0.3, "val_loss": val, "lr": 5e-4,
                    "tokens": step * 900, "tokens_per_s": 250.0, "time": step * 4.0})
    refs = [f'{{"priority": "high", "product": "router {i}"}}' for i in range(20)]
    answers = {
        "base": [f"Sure! Here is a summary of ticket {i}: the customer has a router problem." for i in range(20)],
        "finetuned": [r if i % 7 else r.replace("high", "low") for i, r in enumerate(refs)],
        "gguf-Q8_0": [r if i % 5 else r.replace("high", "low") for i, r in enumerate(refs)],
    }
    names = ["exact_match", "rouge", "bleu"]
    models, per_example = {}, {}
    for name, outs in answers.items():
        from finetune import metrics

        corpus, rows, sources = metrics.score_generations(names, outs, refs)
        models[name] = {"model": f"/models/{name}", **corpus, "answers_cut_at_max_new_tokens": 0}
        per_example[name] = rows
    models["base"].update(loss=2.41, perplexity=11.1)
    models["finetuned"].update(loss=0.35, perplexity=1.42, train_sample_loss=0.30)
    gguf = {"status": "scored", "variant": "gguf-Q8_0", "path": "/x.gguf", "quant": "Q8_0"}
    verdict = ft_verdict.make_verdict(models, per_example, {}, log, names, gguf)
    result = {"run": "demo", "split": "test", "examples": 20,
              "generation": {"max_new_tokens": 96, "temperature": 0.0, "greedy": True, "batch_size": 16,
                             "padding": "left", "device": "cpu"},
              "models": models, "metric_sources": sources, "gguf": gguf, "verdict": verdict,
              "rules": ft_verdict.VERDICT_RULES}
    examples = [{"id": f"t{i}", "prompt": "...", "messages": [{"role": "user", "content": f"Ticket {i}: my router <b>"}],
                 "reference": refs[i], "answers": {n: a[i] for n, a in answers.items()},
                 "finish_reason": {n: "stop" for n in answers}, "scores": {n: per_example[n][i] for n in answers}}
                for i in range(20)]
    return result, examples, log


def test_report_is_self_contained_and_escapes_text(tmp_path):
    result, examples, log = _result_and_examples()
    path = report.write_report(tmp_path, result, examples, log, title="demo: evaluation")
    page = path.read_text()
    assert "src='http" not in page and 'src="http' not in page  # nothing fetched from elsewhere
    images = [part.split("'", 1)[0] for part in page.split("data:image/png;base64,")[1:]]
    assert len(images) == 2
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert "my router &lt;b&gt;" in page  # user text is escaped, never interpreted as HTML
    assert "Fine-tuning helped" in page and "GGUF Q8_0" in page


def test_model_answers_and_names_are_escaped(tmp_path):
    result, examples, log = _result_and_examples()
    examples[0]["answers"]["finetuned"] = "if a < b && c > 0: <script>alert(1)</script>"
    result["models"]["finetuned"]["model"] = "/models/<ft>&co"
    page = report.render_html(result, examples, title="x & <y>", loss_png=None, metrics_png=None)
    assert "if a &lt; b &amp;&amp; c &gt; 0: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<code>/models/&lt;ft&gt;&amp;co</code>" in page and "<title>x &amp; &lt;y&gt;</title>" in page
    assert "<script>" not in page and "a < b" not in page


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run "
                           "the browser check of report.html")
def test_report_renders_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    result, examples, log = _result_and_examples()
    path = report.write_report(tmp_path, result, examples, log, title="demo: evaluation")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(path.as_uri())
        # both plots decoded and laid out at a visible size
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.clientWidth])")
        assert len(sizes) == 2 and all(natural > 300 and shown > 200 for natural, shown in sizes)
        assert page.locator("table.examples tr").count() == 1 + report.SAMPLE_SIZE
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 20_000
