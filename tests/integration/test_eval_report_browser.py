"""report.html shows its plots in a real headless browser (Debian's chromium via playwright). That the page is
self-contained: tests/unit/test_eval_report.py."""

from __future__ import annotations

import shutil

import pytest
from eval_fixtures import result_and_examples

from finetune import eval_report as report

CHROMIUM = "/usr/bin/chromium"

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run "
                           "the browser check of report.html")
def test_report_renders_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    result, examples, log = result_and_examples()
    path = report.write_report(tmp_path, result, examples, log, title="demo: evaluation")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(path.as_uri())
        # both plots decoded and laid out at a visible size
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.clientWidth])")
        assert len(sizes) == 2 and all(natural > 300 and shown > 200 for natural, shown in sizes)
        # the side-by-side table: a header, then every example some model got wrong and up to SAMPLE_SIZE more
        assert page.locator("table.examples tr").count() == 1 + len(report.pick_sample(examples))
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 20_000
