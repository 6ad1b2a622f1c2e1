"""The page in a real browser: `python -m serve` in a subprocess on a free loopback port, driven by
headless Chromium (Debian's /usr/bin/chromium, through Playwright's Python client: Playwright never
downloads a browser of its own here)."""

import json
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


# -----------------------------------------------------------------------------
# Explain: the review's words coloured by their share of the prediction

EXPLAIN_REVIEW = "The acting was superb  and the story moving.\nSadly the ending is dull and  awful."
TRANSPARENT = "rgba(0, 0, 0, 0)"


def word_styles(page):
    """Per highlighted word: (text, data-score, computed background colour, underline style, title)."""
    return page.eval_on_selector_all("#explained .word", """spans => spans.map(s => {
        const style = getComputedStyle(s);
        return [s.textContent, Number(s.dataset.score), style.backgroundColor, style.borderBottomStyle, s.title];
    })""")


def test_explain_colours_words_with_a_second_cue_and_a_legend(page, server):
    page.fill("#review", EXPLAIN_REVIEW)
    page.click("#explain")
    page.wait_for_selector("#explanation:not([hidden]) #explained .word")
    assert page.inner_text("#message") == "Explained."
    expected = httpx.post(server + "/explain", json={"text": EXPLAIN_REVIEW}, timeout=120).json()
    label = expected["prediction"]["label"]
    assert page.get_attribute("#label", "data-label") == label  # the prediction, above the text
    assert page.eval_on_selector("#explained", "el => el.textContent") == EXPLAIN_REVIEW  # spaces, newline as typed

    words = word_styles(page)
    scores = [word["attributions"][label] for word in expected["words"]]
    assert [w[0] for w in words] == [word["text"] for word in expected["words"]]
    assert [w[1] for w in words] == pytest.approx(scores, abs=1e-6)
    toward = max(words, key=lambda w: w[1])  # pushed hardest toward the predicted class
    against = min(words, key=lambda w: w[1])  # and against it
    assert toward[1] > 0 > against[1], "the review should have words of both signs"
    assert TRANSPARENT not in (toward[2], against[2]) and toward[2] != against[2]  # two hues
    assert (toward[3], against[3]) == ("solid", "dashed")  # and a cue that is not colour
    weakest = min(words, key=lambda w: abs(w[1]))
    assert weakest[2] != toward[2]  # deeper colour for more weight
    name = {"pos": "Positive", "neg": "Negative"}[label]
    assert toward[4] == f"{toward[0]}: +{toward[1]:.4f} of P({label}) (toward {name})"  # the exact score on hover
    assert against[4] == f"{against[0]}: {against[1]:.4f} of P({label}) (against {name})"

    assert page.is_visible("#legend")
    legend = page.inner_text("#legend")
    assert f"pushed toward {name}" in legend and "solid underline" in legend and "dashed underline" in legend
    legend_styles = page.eval_on_selector_all("#legend .word",
                                              "spans => spans.map(s => getComputedStyle(s).borderBottomStyle)")
    assert legend_styles == ["solid", "dashed"]  # the legend shows the cues it names
    note = page.inner_text("#explain-note")
    assert "longer than the model reads" not in note and f"Integrated Gradients, {expected['n_steps']} steps" in note
    assert page.console_errors == []

    page.click("#analyze")  # a plain prediction hides the explanation of before
    page.wait_for_selector("#message:has-text('Done.')")
    assert page.is_hidden("#explanation")


def test_explain_keeps_the_text_marks_what_was_cut_and_explains_429(page):
    """A made-up answer (the page's side only): an emoji (two UTF-16 units, one code point in the
    server's offsets), whitespace runs, and a review cut after its third word."""
    text = "Great  😍 film\n\nbut far too long"
    words = [("Great", 0, 5, 0.3), ("😍", 7, 8, -0.1), ("film", 9, 13, 0.05)]
    answer = {"prediction": {"label": "pos", "score": 0.8, "scores": {"neg": 0.2, "pos": 0.8}},
              "words": [{"text": w, "start": s, "end": e, "attributions": {"neg": -a, "pos": a}}
                        for w, s, e, a in words],
              "truncated": True, "num_tokens": 6, "max_length": 6, "n_steps": 32,
              "deltas": {"neg": 1e-4, "pos": -1e-4}, "baseline_scores": {"neg": 0.45, "pos": 0.55}, "seconds": 1.5}
    page.route("**/explain", lambda route: route.fulfill(status=200, content_type="application/json",
                                                         body=json.dumps(answer)))
    page.fill("#review", text)
    page.click("#explain")
    page.wait_for_selector("#explanation:not([hidden])")
    assert page.eval_on_selector("#explained", "el => el.textContent") == text
    assert [w[0] for w in word_styles(page)] == ["Great", "😍", "film"]
    assert page.inner_text("#explained .unseen") == "\n\nbut far too long"  # not seen by the model: greyed
    assert "longer than the model reads (6 tokens)" in page.inner_text("#explain-note")

    page.unroute("**/explain")
    page.route("**/explain", lambda route: route.fulfill(
        status=429, content_type="application/json", headers={"retry-after": "7"},
        body='{"error": "server busy: 1 explanation is already running", "error_type": "Overloaded"}'))
    page.click("#explain")
    page.wait_for_selector("#message.error")
    assert page.inner_text("#message") == "Another explanation is running; try again in 7 s."
    assert page.is_enabled("#explain") and page.is_enabled("#analyze")
