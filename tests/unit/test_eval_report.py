"""report.html is self-contained: plots inlined as PNG, nothing fetched from elsewhere, user text and model answers
escaped. The page in a real headless browser: tests/integration/test_eval_report_browser.py."""

from __future__ import annotations

import base64

from eval_fixtures import result_and_examples

from finetune import eval_report as report


def test_report_is_self_contained_and_escapes_text(tmp_path):
    result, examples, log = result_and_examples()
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
    result, examples, log = result_and_examples()
    examples[0]["answers"]["finetuned"] = "if a < b && c > 0: <script>alert(1)</script>"
    result["models"]["finetuned"]["model"] = "/models/<ft>&co"
    page = report.render_html(result, examples, title="x & <y>", loss_png=None, metrics_png=None)
    assert "if a &lt; b &amp;&amp; c &gt; 0: &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<code>/models/&lt;ft&gt;&amp;co</code>" in page and "<title>x &amp; &lt;y&gt;</title>" in page
    assert "<script>" not in page and "a < b" not in page
