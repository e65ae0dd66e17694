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


def test_export_quantization_table_and_chart_are_in_the_report(tmp_path):
    """With an export, the report shows its quantization table (every type, the picked one in bold, missing figures
    as dashes) and the size-vs-quality chart, inlined."""
    from finetune.gguf import quant_table

    result, examples, log = result_and_examples()
    rows = [{"type": "F16", "file": "a-F16.gguf", "bytes": 270 * 2**20, "imatrix": False, "top1_agreement": 1.0,
             "kl_mean": 0.00001, "ppl_gguf": 31.3, "exact_match": 0.98, "examples": 50, "decode_tokens_per_s": 61.0},
            {"type": "Q4_K_M", "file": "a-Q4_K_M.gguf", "bytes": 101 * 2**20, "imatrix": True,
             "top1_agreement": 0.885, "kl_mean": 0.047, "ppl_gguf": 33.4, "exact_match": 0.96, "examples": 50,
             "decode_tokens_per_s": None}]
    chart = quant_table.plot(rows, tmp_path / "quantization.png")
    quant = {"rows": rows, "picked": "Q4_K_M", "why": "smallest type within 0.20 GB whose exact match (0.96) is "
             "within 0.02 of F16 (0.98)", "fit_gb": 0.2, "tolerance": 0.02}
    (tmp_path / "out").mkdir()
    page = report.write_report(tmp_path / "out", result, examples, log, title="demo", quantization=quant,
                               quantization_png=chart.read_bytes()).read_text()
    assert "Which GGUF to ship" in page and "Picked for 0.2 GB: <b>Q4_K_M</b>" in page
    assert "<td><b>Q4_K_M</b></td>" in page and "<td>F16</td>" in page
    assert "0.885" in page and "0.96 (n=50)" in page and "101" in page and "&ndash;" in page
    assert len(page.split("data:image/png;base64,")) == 4  # loss curves, metrics and the quantization chart
    quant["fit_gb"] = None  # without a budget nothing is "picked"
    page = report.render_html(result, examples, title="demo", loss_png=None, metrics_png=None, quantization=quant)
    assert "Picked for" not in page and "<b>Q4_K_M</b>" not in page and "Which GGUF to ship" in page
    assert "Which GGUF to ship" not in report.render_html(result, examples, title="demo", loss_png=None,
                                                          metrics_png=None)


def test_eval_takes_the_quantization_chart_from_the_export_record(tmp_path):
    """evaluate inlines the chart the export record names (an older record without one: the table alone)."""
    import json

    from finetune import evaluate
    from finetune.gguf import quant_table
    from finetune.run import artifacts

    result, examples, log = result_and_examples()
    rows = [{"type": "F16", "file": "a-F16.gguf", "bytes": 270 * 2**20, "imatrix": False, "top1_agreement": 1.0,
             "exact_match": 0.98, "examples": 50}]
    (tmp_path / "export").mkdir()
    table = tmp_path / "export" / "table.json"
    table.write_text(json.dumps({"rows": rows, "picked": None, "why": "", "fit_gb": None, "tolerance": 0.02}))
    chart = quant_table.plot(rows, tmp_path / "export" / "size-vs-quality.png")
    for recorded, images in ((chart, 4), (None, 3)):  # loss curves, metrics (and the chart)
        exported = artifacts.Exported(merged=tmp_path / "merged", gguf={}, quantization=table,
                                      quantization_chart=recorded)
        out = tmp_path / f"eval-{images}"
        out.mkdir()
        evaluate._write_outputs(out, result, examples, log, None, title="demo", exported=exported)
        page = (out / "report.html").read_text()
        assert "Which GGUF to ship" in page and len(page.split("data:image/png;base64,")) == images
