"""The web chat page in a real browser (Debian's chromium driven by Playwright): send a message, watch the reply
stream in, rate it, suggest a better answer, and find both in the server's feedback store. Writes a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "screenshots"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: `apt-get install -y chromium` (as root; "
                       "`make test` runs scripts/ensure_chromium.sh) enables the browser test"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from finetune.models import embedded_gguf_path
    from serve.launch import ServerProcess

    store = tmp_path_factory.mktemp("browser-store")
    with ServerProcess(embedded_gguf_path(), ["serve.threads=1", "serve.n_ctx=1024"], api_key="browser-key",
                       store=store) as srv:
        srv.store_dir = store
        yield srv


@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        requests: list[str] = []
        pg.on("request", lambda req: requests.append(req.url))
        pg.goto(server.url + "/")
        yield pg
        assert errors == [], f"JavaScript errors on the page: {errors}"
        outside = [u for u in requests if not u.startswith(server.url)]
        assert outside == [], f"the page loaded something from elsewhere (must work offline): {outside}"
        browser.close()


def test_chat_page_streams_and_stores_feedback(server, page):
    from finetune.feedback_store import FeedbackStore

    # The server has an API key: the page shows the key field; fill it in.
    page.get_by_test_id("api-key").wait_for(state="visible", timeout=15000)
    page.get_by_test_id("api-key").fill("browser-key")
    page.get_by_test_id("system").fill("You are a friendly assistant.")
    page.get_by_test_id("max-tokens").fill("40")
    page.get_by_test_id("input").fill("Hello! Tell me about the sea.")
    page.get_by_test_id("input").press("Enter")

    reply = page.get_by_test_id("msg-assistant").last
    body = reply.locator(".body")
    # Streaming: while the reply is still being generated, some text is already on screen.
    page.wait_for_function(
        "() => { const b = document.querySelector('.msg.assistant .body');"
        " return b && b.classList.contains('streaming') && b.textContent.length > 0; }", timeout=120000)
    partial = body.text_content()
    page.get_by_test_id("suggest").wait_for(timeout=180000)  # the actions appear when the reply is complete
    final = body.text_content()
    assert final and final.startswith(partial) and len(final) > len(partial)

    # Good is offered only on a finished reply: one cut at max tokens can be rated Bad or get a better answer.
    cut = "cut at max tokens" in reply.locator(".meta").first.text_content()
    rating = "down" if cut else "up"
    assert reply.get_by_test_id("thumbs-up").is_visible() is not cut
    reply.get_by_test_id("thumbs-up" if rating == "up" else "thumbs-down").click()
    page.get_by_test_id("feedback-saved").wait_for(timeout=15000)
    page.get_by_test_id("suggest").click()
    page.get_by_test_id("better-text").fill("The sea covers most of the Earth.")
    page.get_by_test_id("better-save").click()
    page.wait_for_function("() => !document.querySelector('.better')", timeout=15000)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    store = FeedbackStore(server.store_dir)
    feedback = store.feedback()
    store.close()
    assert [(f["rating"], f["correction"]) for f in feedback] == [(rating, None),
                                                                  (None, "The sea covers most of the Earth.")]
    first = feedback[0]
    assert first["source"] == "web" and first["reply"] == final and first["completion_id"].startswith("chatcmpl-")
    assert first["finish_reason"] == ("length" if cut else "stop")
    assert first["messages"] == [{"role": "system", "content": "You are a friendly assistant."},
                                 {"role": "user", "content": "Hello! Tell me about the sea."}]


def test_no_good_button_on_a_reply_cut_at_max_tokens(page):
    page.get_by_test_id("new-chat").click()
    page.get_by_test_id("max-tokens").fill("2")
    page.get_by_test_id("input").fill("Tell me everything you know about the sea.")
    page.get_by_test_id("send").click()
    reply = page.get_by_test_id("msg-assistant").last
    reply.get_by_test_id("suggest").wait_for(timeout=180000)
    assert "cut at max tokens" in reply.locator(".meta").first.text_content()
    assert not reply.get_by_test_id("thumbs-up").is_visible() and reply.get_by_test_id("thumbs-down").is_visible()
    page.get_by_test_id("max-tokens").fill("40")


def test_new_chat_clears_the_conversation(page):
    assert page.get_by_test_id("msg-user").count() >= 1
    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("msg-user").count() == 0 and page.get_by_test_id("msg-assistant").count() == 0
    page.get_by_test_id("input").fill("Hi again")
    page.get_by_test_id("send").click()
    page.get_by_test_id("suggest").wait_for(timeout=180000)
    assert page.get_by_test_id("msg-user").count() == 1
