"""The page in a real browser: `python -m serve` in a subprocess on a free loopback port, driven by
headless Chromium (Debian's /usr/bin/chromium, through Playwright's Python client: Playwright never
downloads a browser of its own here)."""

import os
import re

import httpx
import pytest

from conftest import free_port, server_process
from models import MINILM, save_minilm_classifier

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REVIEW = "The acting was superb and the story kept me guessing until the very end. A wonderful film."

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install -y chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of `python -m serve` serving minilm-l6 with a 2-label head, once /health says ready."""
    if not MINILM.is_dir():
        pytest.skip(f"{MINILM} is missing (the shared test model)")
    model_dir = save_minilm_classifier(tmp_path_factory.mktemp("served") / "model")
    port = free_port()
    log_path = tmp_path_factory.mktemp("log") / "server.log"
    with server_process(["-m", "serve", "--model_dir", str(model_dir), "--port", str(port)], port, log_path) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary profile (user-data-dir).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             chromium_sandbox=False, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    page.goto(server)
    page.wait_for_selector("#model-info:has-text('Model:')")
    yield page
    context.close()


def api_prediction(server, text):
    return httpx.post(server + "/predict", json={"text": text}).json()["predictions"][0]


def shown_prediction(page):
    """(label, {class: percent shown}) as the page displays them."""
    page.wait_for_selector("#result:not([hidden]) .bar-row")
    label = page.get_attribute("#label", "data-label")
    bars = {}
    for row in page.query_selector_all(".bar-row"):
        meter = row.query_selector("[role=meter]")
        bars[row.get_attribute("data-label")] = float(meter.get_attribute("aria-valuenow"))
        width = row.query_selector(".fill").evaluate("el => el.style.width")
        assert width == meter.get_attribute("aria-valuenow") + "%"
    return label, bars


def test_analyze_shows_label_bars_and_time(page, server, tmp_path):
    page.fill("#review", REVIEW)
    page.click("#analyze")
    label, bars = shown_prediction(page)
    expected = api_prediction(server, REVIEW)
    assert label == expected["label"]
    assert page.inner_text("#label") == {"pos": "Positive", "neg": "Negative"}[expected["label"]]
    assert bars == {name: pytest.approx(100 * p, abs=0.051) for name, p in expected["scores"].items()}
    assert re.fullmatch(r"Took \d+ ms \(round trip to the server\)\.", page.inner_text("#elapsed"))
    assert page.inner_text("#message") == "Done."

    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    data = screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert page.console_errors == []  # e.g. nothing blocked by the page's no-external-assets policy


def test_keyboard_only_ctrl_enter_and_examples(page, server):
    page.keyboard.press("Tab")  # first focusable element: the review box
    assert page.evaluate("document.activeElement.id") == "review"
    page.keyboard.type("Two hours of my life I will never get back. Avoid.")
    page.keyboard.press("Control+Enter")
    label, _ = shown_prediction(page)
    assert label == api_prediction(server, "Two hours of my life I will never get back. Avoid.")["label"]

    example = page.locator("[data-example]").nth(1)
    example_text = example.get_attribute("data-example")
    example.click()
    page.wait_for_function("t => document.getElementById('review').value === t", arg=example_text)
    page.wait_for_selector("#message:has-text('Done.')")
    label, bars = shown_prediction(page)
    expected = api_prediction(server, example_text)
    assert label == expected["label"] and bars["pos"] == pytest.approx(100 * expected["scores"]["pos"], abs=0.051)


def test_empty_input_and_server_errors_are_explained(page):
    page.fill("#review", "   \n  ")
    page.click("#analyze")
    assert page.inner_text("#message") == "Please paste or type a review first."
    assert page.get_attribute("#message", "role") == "alert"
    assert page.is_hidden("#result")

    page.route("**/predict", lambda route: route.fulfill(
        status=429, content_type="application/json", body='{"error": "server busy: retry shortly."}'))
    page.fill("#review", "A fine film.")
    page.click("#analyze")
    page.wait_for_selector("#message.error:has-text('server busy')")
    assert page.inner_text("#message") == "Error: server busy: retry shortly."
    assert page.is_enabled("#analyze")  # ready for another try


def test_readable_on_a_phone(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    page.goto(server)
    page.fill("#review", REVIEW)
    page.click("#analyze")
    shown_prediction(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    box = page.locator("#analyze").bounding_box()
    assert box["height"] >= 40  # a thumb-sized button
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    assert (tmp_path / "phone.png").read_bytes().startswith(b"\x89PNG")
    context.close()
