"""POST /explain (serve/explaining.py, serve/app.py): the answer's shape and values, the refusals /predict
makes, the cap (429 with Retry-After while /predict keeps answering), /info, the off switch, the
model copy of its own, and SIGTERM during an explanation.

Most tests run the app in-process on the tiny served BERT; explanations overlap there through an
explainer that waits at a gate the test opens. The real-weights tests run minilm-l6, the last two
in a real server process, where a 512-token review takes long enough to overlap with everything else.
"""

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import answers_health, free_port
from training.errors import UsageError
from training.explain import N_STEPS, Explainer
from model_utils import load_for_inference
from models import IMDB_TEST, ROOT
from serve.app import EXPLAIN_OFF, STOPPED_BY_SHUTDOWN, ServeConfig, create_app, parse_config, validate_config
from serve.classifier import Classifier
from serve.explaining import Explaining, ShuttingDown, load_explaining
from serve.memory import uses_glibc_malloc

TEXT = "A wonderful  film,\n truly awful 😍 ending.\tSuperb cast!"  # double spaces, a newline, a tab, an emoji
SLOW = "slow: "  # the gated explainer waits at texts that start so
ANSWER_KEYS = ["prediction", "words", "truncated", "num_tokens", "max_length", "n_steps", "deltas",
               "baseline_scores", "seconds"]


# -----------------------------------------------------------------------------
# fixtures and helpers


def serve(model_dir, load_classifier=Classifier, load_explainer=load_explaining, **overrides):
    """A TestClient around a fresh app (enter it to start the lifespan), on the CPU: a GPU would serve
    /predict in float16, and the comparisons' tolerances are float32's."""
    cfg = validate_config(ServeConfig(model_dir=str(model_dir), **{"device": "cpu", **overrides}))
    return TestClient(create_app(cfg, load_classifier, load_explainer=load_explainer), raise_server_exceptions=False)


def wait_until(condition, timeout=60, what="the condition"):
    """Poll `condition()` until it is true: waiting on a state, not on a guess of how long it takes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


def wait_ready(client):
    wait_until(lambda: client.get("/health").status_code == 200, what="/health 200")


@pytest.fixture(scope="module")
def client(tiny_dir):
    with serve(tiny_dir) as c:
        wait_ready(c)
        yield c


def explain(client, text, **body):
    response = client.post("/explain", json={"text": text, **body})
    assert response.status_code == 200, response.text
    return response.json()


def predict(client, text):
    response = client.post("/predict", json={"text": text})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def assert_consistent(answer, text):
    """What every answer must satisfy, whatever the model: words slice the text, per class the words'
    scores add up to scores - baseline_scores (less the reported delta), the prediction is the argmax."""
    labels = list(answer["prediction"]["scores"])
    for word in answer["words"]:
        assert text[word["start"]:word["end"]] == word["text"] and word["text"].strip() == word["text"] != ""
        assert list(word["attributions"]) == labels
        assert sum(word["attributions"].values()) == pytest.approx(0, abs=1e-5)  # probabilities sum to 1
    for before, after in zip(answer["words"], answer["words"][1:]):
        assert before["end"] < after["start"] and text[before["end"]:after["start"]].isspace()
    for name in labels:
        total = sum(word["attributions"][name] for word in answer["words"])
        change = answer["prediction"]["scores"][name] - answer["baseline_scores"][name]
        assert total - change == pytest.approx(answer["deltas"][name], abs=1e-5)  # Captum's delta, exactly that
    scores = answer["prediction"]["scores"]
    assert answer["prediction"]["label"] == max(scores, key=scores.get)
    assert answer["prediction"]["score"] == scores[answer["prediction"]["label"]]
    assert sum(scores.values()) == pytest.approx(1, abs=1e-6)


def long_review():
    """An IMDb review of well over 512 tokens."""
    reviews = pd.read_parquet(IMDB_TEST)["text"]
    return reviews[reviews.str.len() > 4000].iloc[0]


class GatedExplainer:
    """explain.Explainer, except that a text starting with SLOW waits until the test opens the gate."""

    def __init__(self, explainer):
        self.explainer = explainer
        self.started = threading.Event()
        self.gate = threading.Event()

    def explain(self, text, **options):
        if text.startswith(SLOW):
            self.started.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return self.explainer.explain(text, **options)

    def __getattr__(self, name):  # model, labels, encode: the real explainer's
        return getattr(self.explainer, name)


def gated_loader(holder):
    """A load_explainer whose explainer is gated; `holder` (a list) receives the GatedExplainer."""

    def load(model_dir, cfg, device):
        model, tokenizer = load_for_inference(model_dir, device, torch.float32)
        holder.append(GatedExplainer(Explainer(model, tokenizer)))
        return Explaining(holder[-1], cfg.max_concurrent_explains, cfg.explain_n_steps)

    return load


# -----------------------------------------------------------------------------
# the answer


def test_answer_shape_and_values(client, tiny_dir):
    answer = explain(client, TEXT)
    assert list(answer) == ANSWER_KEYS
    assert list(answer["prediction"]) == ["label", "score", "scores"]  # /predict's Prediction
    assert list(answer["prediction"]["scores"]) == ["neg", "pos"]
    assert [list(word) for word in answer["words"]] == [["text", "start", "end", "attributions"]] * len(TEXT.split())
    assert [word["text"] for word in answer["words"]] == TEXT.split()  # offsets in code points: the emoji is one
    assert_consistent(answer, TEXT)
    assert max(abs(d) for d in answer["deltas"].values()) < 1e-3  # 32 steps: the integral is close
    model, tokenizer = load_for_inference(str(tiny_dir))
    expected = Explainer(model, tokenizer).explain(TEXT)  # explain.py itself, in the test's process
    assert [w["attributions"]["pos"] for w in answer["words"]] == pytest.approx(expected.attributions["pos"], abs=1e-6)
    assert answer["baseline_scores"] == pytest.approx(expected.baseline_scores, abs=1e-6)
    assert (answer["truncated"], answer["num_tokens"], answer["max_length"], answer["n_steps"]) == (
        False, len(tokenizer(TEXT)["input_ids"]), 64, N_STEPS)
    assert 0 < answer["seconds"] < 60
    words = {w["text"]: w["attributions"]["pos"] for w in answer["words"]}
    assert len({round(score, 4) for score in words.values()}) >= 6  # the words really score differently


def test_prediction_equals_predicts_within_float_tolerance(client):
    """/predict runs packed batches on the serving model; /explain its own fp32 copy, padded to 16 tokens: the
    same numbers to float rounding."""
    for text in (TEXT, "great film", "the worst waste of time", "\x00 nothing but control characters \x07"):
        explained, predicted = explain(client, text)["prediction"], predict(client, text)
        assert explained["label"] == predicted["label"]
        assert explained["scores"] == pytest.approx(predicted["scores"], abs=1e-5)


def test_long_review_is_truncated_as_predict_truncates(client):
    text = " ".join(f"word{i} great" for i in range(80))  # far over 64 tokens
    right, left = explain(client, text), explain(client, text, truncation_direction="Left")
    for answer in (right, left):
        assert answer["truncated"] is True and answer["num_tokens"] == answer["max_length"] == 64
        assert_consistent(answer, text)
    assert right["words"][0]["start"] == 0 and right["words"][-1]["end"] < len(text)  # the beginning is explained
    assert left["words"][0]["start"] > 0 and left["words"][-1]["end"] == len(text)  # the end
    lower = explain(client, text, truncation_direction="left")["words"]  # TEI's spelling, or ours
    assert [(w["start"], w["end"]) for w in lower] == [(w["start"], w["end"]) for w in left["words"]]
    assert [w["attributions"]["pos"] for w in lower] == pytest.approx([w["attributions"]["pos"] for w in left["words"]])
    tei = client.post("/predict", json={"inputs": text, "truncation_direction": "Left"}).json()
    assert {p["label"]: p["score"] for p in tei} == pytest.approx(left["prediction"]["scores"], abs=1e-5)


def test_chunks_change_memory_not_the_result(tiny_dir):
    """Long texts go through Captum in chunks of path points: the same scores as in one pass."""
    model, tokenizer = load_for_inference(str(tiny_dir))
    whole = Explaining(Explainer(model, tokenizer), max_concurrent=1, n_steps=32)
    model, tokenizer = load_for_inference(str(tiny_dir))
    chunked = Explaining(Explainer(model, tokenizer), max_concurrent=1, n_steps=32, chunk_tokens=100)
    tokens = len(tokenizer(TEXT)["input_ids"])  # 32 steps x tokens (one class computed of two): over 100
    assert whole.chunk_rows(tokens) is None and chunked.chunk_rows(tokens) == max(1, 100 // tokens)
    (a, _), (b, _) = whole.submit(TEXT, "right").result(), chunked.submit(TEXT, "right").result()
    assert a.attributions["pos"] == pytest.approx(b.attributions["pos"], abs=1e-6)
    assert a.deltas == pytest.approx(b.deltas, abs=1e-6)
    whole.close()
    chunked.close()


def test_real_weights_explanation_agrees_with_predict(minilm_dir):
    """minilm-l6, a short review and one of over 512 tokens (4 steps: the long one stays cheap)."""
    with serve(minilm_dir, explain_n_steps=4) as c:
        wait_ready(c)
        for text in ("The acting was superb and the story moving. A wonderful film.", long_review()):
            answer = explain(c, text)
            assert_consistent(answer, text)
            predicted = predict(c, text)
            assert answer["prediction"]["label"] == predicted["label"]
            assert answer["prediction"]["scores"] == pytest.approx(predicted["scores"], abs=1e-4)
            assert answer["n_steps"] == 4 and answer["max_length"] == 512
        assert answer["truncated"] is True and answer["num_tokens"] == 512  # the long one


# -----------------------------------------------------------------------------
# refusals: what /predict refuses in {"text": ...}, with the same codes


REFUSED = [
    ({"text": ""}, 422),  # empty
    ({"text": " \n\t "}, 422),  # blank
    ({"text": 5}, 422),  # not a string
    ({"text": ["a review"]}, 422),
    ({"text": None}, 422),
    ({"text": "x" * 501}, 413),  # over --max_chars (500 here)
    ([{"text": "a review"}], 422),  # not an object
    ({"text": "a review", "extra": 1}, 422),  # unknown field
    ({}, 422),
]


@pytest.fixture(scope="module")
def small_limits(tiny_dir):
    with serve(tiny_dir, max_chars=500, max_body_bytes=2000) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(("body", "status"), REFUSED, ids=[json.dumps(b)[:30] for b, _ in REFUSED])
def test_refuses_what_predict_refuses(small_limits, body, status):
    explained, predicted = small_limits.post("/explain", json=body), small_limits.post("/predict", json=body)
    assert explained.status_code == predicted.status_code == status, (explained.text, predicted.text)
    assert list(explained.json()) == ["error", "error_type"] and explained.json()["error_type"] == "Validation"


@pytest.mark.parametrize(("content", "status"), [
    (b'{"text": "\\ud800 lone surrogate"}', 422),  # not Unicode text
    (b'{"text": "\xff\xfe not utf-8"}', {400, 422}),  # not UTF-8: FastAPI's refusal, its status (400 in 0.1xx)
    (b"{not json", 422),
    (json.dumps({"text": "x" * 3000}).encode(), 413),  # over --max_body_bytes (2000 here): the middleware
])
def test_refuses_raw_bodies_as_predict_does(small_limits, content, status):
    headers = {"content-type": "application/json"}
    explained = small_limits.post("/explain", content=content, headers=headers)
    predicted = small_limits.post("/predict", content=content, headers=headers)
    assert explained.status_code == predicted.status_code, (explained.text, predicted.text)
    assert explained.status_code in (status if isinstance(status, set) else {status}), explained.text
    assert explained.json()["error_type"] == predicted.json()["error_type"]


def test_only_one_text_and_our_field_names(client):
    """/predict's other shapes are not /explain's: several texts, or TEI's "inputs", are refused by name."""
    many = client.post("/explain", json={"texts": ["a", "b"]})
    assert many.status_code == 422 and "unknown field 'texts'" in many.json()["error"]
    assert "POST /explain takes 'text' and 'truncation_direction'" in many.json()["error"]
    direction = client.post("/explain", json={"text": "fine", "truncation_direction": "middle"})
    assert direction.status_code == 422 and direction.json()["error"].startswith("truncation_direction: ")


# -----------------------------------------------------------------------------
# the cap: 429 with Retry-After at once, while /predict keeps answering


@pytest.mark.parametrize("cap", [1, 2])
def test_over_the_cap_429_with_retry_after_while_predict_answers(tiny_dir, cap):
    gated = []
    with serve(tiny_dir, load_explainer=gated_loader(gated), max_concurrent_explains=cap) as c, \
            ThreadPoolExecutor(cap) as pool:
        wait_ready(c)
        explainer = gated[0]
        admitted = lambda: c.get("/info").json()["explain"]["admitted"]  # noqa: E731
        slow = [pool.submit(c.post, "/explain", json={"text": f"{SLOW}great film {i}"}) for i in range(cap)]
        assert explainer.started.wait(30)  # the first one runs (and waits at the gate) ...
        wait_until(lambda: admitted() == cap, what=f"{cap} explanations admitted")  # ... the others wait for it
        started = time.monotonic()
        refused = c.post("/explain", json={"text": "great film"})
        assert time.monotonic() - started < 5  # answered at once, not queued
        assert refused.status_code == 429
        assert refused.json()["error_type"] == "Overloaded"
        assert f"the limit, --max_concurrent_explains, is {cap}" in refused.json()["error"]
        retry_after = refused.headers["retry-after"]
        assert retry_after.isdigit() and int(retry_after) >= 1
        assert f"retry in {retry_after} s" in refused.json()["error"]
        for i in range(5):  # the batching worker is not the explainer's thread: predictions go on
            assert predict(c, f"a dull film {i}")["label"] in ("neg", "pos")
        assert admitted() == cap and not any(f.done() for f in slow)  # all the while, the explanations ran
        explainer.gate.set()
        answers = [f.result(timeout=60) for f in slow]
        assert [a.status_code for a in answers] == [200] * cap
        assert_consistent(answers[0].json(), f"{SLOW}great film 0")
        assert admitted() == 0
        assert explain(c, "great film")["words"][0]["text"] == "great"  # a slot again
        assert c.get("/info").json()["explain"]["explanations"] == cap + 1


def test_retry_after_counts_the_running_texts_tokens(tiny_dir):
    """Retry-After: the running explanation's tokens at the last one's seconds per token, less what it ran."""
    model, tokenizer = load_for_inference(str(tiny_dir))
    explaining = Explaining(Explainer(model, tokenizer), max_concurrent=1, n_steps=4)
    explaining.seconds_per_token = 0.5
    explaining.running = (time.perf_counter() - 3.0, 20)  # started 3 s ago, 20 tokens: 10 s in all
    assert explaining.retry_after() == 7
    explaining.running = (time.perf_counter() - 30.0, 20)  # late: still at least 1
    assert explaining.retry_after() == 1
    explaining.running, explaining.last_seconds = None, 2.5  # admitted, not started: one more explanation
    assert explaining.retry_after() == 3
    explaining.close()


# -----------------------------------------------------------------------------
# /info, the flags, the off switch


def test_info_shows_the_cap_and_the_steps(tiny_dir):
    with serve(tiny_dir, max_concurrent_explains=3, explain_n_steps=8) as c:
        wait_ready(c)
        assert c.get("/info").json()["explain"] == {"enabled": True, "max_concurrent_explains": 3, "n_steps": 8,
                                                    "dtype": "float32", "admitted": 0, "explanations": 0,
                                                    "malloc_trims": 0}
        assert explain(c, "great film")["n_steps"] == 8
        assert explain(c, "dull film")["n_steps"] == 8
        assert c.get("/info").json()["explain"]["explanations"] == 2
        # the explainer's thread trims after answering each one: the count may lag the answer by that call
        trims, deadline = 2 if uses_glibc_malloc() else 0, time.monotonic() + 10
        while c.get("/info").json()["explain"]["malloc_trims"] != trims and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/info").json()["explain"]["malloc_trims"] == trims
        schema = c.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert set(operation["responses"]) == {"200", "400", "413", "422", "429", "503"}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ExplainResponse"}
    assert set(operation["responses"]["429"]["headers"]) == {"retry-after"}
    request = schema["components"]["schemas"]["ExplainRequest"]
    assert (request["required"], request["additionalProperties"]) == (["text"], False)
    assert request["properties"]["text"]["maxLength"] == 100_000
    assert set(schema["components"]["schemas"]["ExplainResponse"]["required"]) == set(ANSWER_KEYS)


def test_flags_and_their_checks(tiny_dir):
    cfg = parse_config(["--model_dir", str(tiny_dir), "--max_concurrent_explains", "0", "--explain_n_steps", "8"])
    assert (cfg.max_concurrent_explains, cfg.explain_n_steps) == (0, 8)
    assert (ServeConfig().max_concurrent_explains, ServeConfig().explain_n_steps) == (1, N_STEPS)
    for flag, value in (("max_concurrent_explains", -1), ("explain_n_steps", 0)):
        with pytest.raises(UsageError, match=f"--{flag} must be"):
            validate_config(ServeConfig(model_dir=str(tiny_dir), **{flag: value}))


def test_off_answers_404_saying_how_to_enable_and_loads_no_copy(tiny_dir):
    def no_copy(*args):
        raise AssertionError("with --max_concurrent_explains 0 no copy may be loaded")

    with serve(tiny_dir, load_explainer=no_copy, max_concurrent_explains=0) as c:
        wait_ready(c)  # ready without it
        for body in ({"text": "great film"}, {"not": "checked"}):
            off = c.post("/explain", json=body)
            assert off.status_code == 404 and off.json() == {"error": EXPLAIN_OFF, "error_type": "Validation"}
        assert "--max_concurrent_explains 1" in EXPLAIN_OFF
        assert c.app.state.model.explaining is None
        assert c.get("/info").json()["explain"] == {"enabled": False, "max_concurrent_explains": 0,
                                                    "n_steps": N_STEPS, "dtype": None, "admitted": 0,
                                                    "explanations": 0, "malloc_trims": 0}
        assert "/explain" not in c.get("/openapi.json").json()["paths"]  # the schema says what is served
        assert predict(c, "great film")["label"] in ("neg", "pos")


# -----------------------------------------------------------------------------
# loading: a copy of its own, covered by /health


def test_health_waits_for_the_explainer_too(tiny_dir):
    gate = threading.Event()

    def slow_copy(model_dir, cfg, device):
        assert gate.wait(30)
        return load_explaining(model_dir, cfg, device)

    with serve(tiny_dir, load_explainer=slow_copy) as c:
        assert c.get("/health").status_code == 503
        assert c.post("/explain", json={"text": "too early"}).status_code == 503
        gate.set()
        wait_ready(c)
        assert explain(c, "great film")["n_steps"] == N_STEPS


def test_an_explainer_that_cannot_load_fails_the_server_as_the_classifier_would(tiny_dir):
    def broken(model_dir, cfg, device):
        raise RuntimeError("out of memory for the copy")

    with serve(tiny_dir, load_explainer=broken) as c:
        wait_until(lambda: "failed" in c.get("/health").json().get("error", ""), what="a failed load")
        assert c.get("/health").json()["error"] == "the model failed to load: out of memory for the copy"
        assert c.post("/explain", json={"text": "great film"}).status_code == 503


def test_own_float32_copy_whose_hooks_never_touch_the_served_model(tiny_dir):
    """The served model in bfloat16 (as on a GPU, float16) and packed; the explainer's copy in float32."""
    with serve(tiny_dir, dtype="bfloat16") as c:
        wait_ready(c)
        state = c.app.state.model
        served, copy = state.classifier.model, state.explaining.explainer.model
        assert served is not copy and served.get_input_embeddings() is not copy.get_input_embeddings()
        assert (served.dtype, copy.dtype) == (torch.bfloat16, torch.float32)
        assert c.get("/info").json()["dtype"] == "bfloat16" and c.get("/info").json()["explain"]["dtype"] == "float32"
        answer = explain(c, TEXT)
        assert_consistent(answer, TEXT)
        assert max(abs(d) for d in answer["deltas"].values()) < 1e-3  # float32's accuracy, not bfloat16's
        assert answer["prediction"]["scores"] == pytest.approx(predict(c, TEXT)["scores"], abs=2e-2)  # bf16 rounding
        embeddings = served.get_input_embeddings()
        assert not embeddings._forward_hooks and not embeddings._forward_pre_hooks  # Captum's hooks: never here
        assert not served._forward_pre_hooks  # nor the shutdown hook


def test_close_stops_a_running_explanation_at_its_next_forward_pass(tiny_dir):
    model, tokenizer = load_for_inference(str(tiny_dir))
    gated = GatedExplainer(Explainer(model, tokenizer))
    explaining = Explaining(gated, max_concurrent=2, n_steps=8)
    running, waiting = explaining.submit(f"{SLOW}great film", "right"), explaining.submit("great film", "right")
    assert gated.started.wait(30)
    closing = threading.Thread(target=explaining.close)
    closing.start()
    wait_until(explaining.stopping.is_set, what="close() to begin")
    gated.gate.set()  # the running one goes on to its first forward pass: stopped there
    closing.join(30)
    assert not closing.is_alive()
    for future in (running, waiting):
        with pytest.raises(ShuttingDown, match="the server is shutting down"):
            future.result(timeout=5)
    assert (explaining.explanations, explaining.stopped, explaining.admitted) == (0, 2, 0)


# -----------------------------------------------------------------------------
# a real server process: explanations that really take long, and SIGTERM


@contextmanager
def server(model_dir, log_path, *flags):
    """`python -m serve` on a free port, ready; yields (process, url). Killed if the test left it running.
    On the CPU, where a 512-token review takes seconds: long enough to overlap with the test's requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "serve", "--model_dir", str(model_dir), "--port", str(port),
                                    "--device", "cpu", *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: answers_health(url) or process.poll() is not None, timeout=180, what="ready")
            assert process.poll() is None, log_path.read_text()[-3000:]
            yield process, url
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def admitted(url):
    return httpx.get(url + "/info", timeout=30).json()["explain"]["admitted"]


def test_real_server_429_while_a_long_explanation_runs_and_sigterm_stops_it(minilm_dir, tmp_path):
    """A 512-token review at 32 steps takes tens of seconds on a CPU: meanwhile a second explanation
    gets 429 at once and /predict answers. SIGTERM with --graceful_shutdown_s 2: uvicorn gives up on
    the open request after 2 s, and the explanation stops at its next chunk instead of running on."""
    log_path = tmp_path / "server.log"
    with server(minilm_dir, log_path, "--graceful_shutdown_s", "2") as (process, url), ThreadPoolExecutor(1) as pool:
        long = pool.submit(httpx.post, url + "/explain", json={"text": long_review()}, timeout=300)
        wait_until(lambda: admitted(url) == 1, what="the long explanation admitted")
        started = time.monotonic()
        refused = httpx.post(url + "/explain", json={"text": "A wonderful film."}, timeout=30)
        assert refused.status_code == 429 and time.monotonic() - started < 5
        assert int(refused.headers["retry-after"]) >= 1
        answers = [httpx.post(url + "/predict", json={"text": f"review {i}: a fine film"}, timeout=30)
                   for i in range(5)]
        assert [a.status_code for a in answers] == [200] * 5
        assert admitted(url) == 1 and not long.done()  # the explanation ran all along
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=120) == 0
        stopped_after = time.monotonic() - started
        cut_short = long.result(timeout=30)
    assert cut_short.status_code == 503  # our error body, not uvicorn's bare 500
    assert cut_short.json() == {"error": STOPPED_BY_SHUTDOWN, "error_type": "Unhealthy"}
    log = log_path.read_text()
    assert "explainer stopped (explanations answered: 0, stopped by the shutdown: 1)" in log, log[-3000:]
    assert "Traceback" not in log
    assert stopped_after < 60  # a chunk of the explanation, not the rest of it


def test_real_server_answers_an_explanation_in_flight_at_sigterm(minilm_dir, tmp_path):
    """The default: SIGTERM lets the requests it has finish, explanations included, then exits 0."""
    log_path = tmp_path / "server.log"
    with server(minilm_dir, log_path, "--explain_n_steps", "4", "--graceful_shutdown_s", "120") as (process, url), \
            ThreadPoolExecutor(1) as pool:
        text = long_review()
        running = pool.submit(httpx.post, url + "/explain", json={"text": text}, timeout=300)
        wait_until(lambda: admitted(url) == 1, what="the explanation admitted")
        process.send_signal(signal.SIGTERM)
        answer = running.result(timeout=240)
        assert answer.status_code == 200
        assert_consistent(answer.json(), text)
        assert process.wait(timeout=60) == 0
    log = log_path.read_text()
    assert "explainer stopped (explanations answered: 1, stopped by the shutdown: 0)" in log, log[-3000:]


def test_the_servers_explainer_pads_to_16_tokens_on_a_cpu_unless_padding_is_off(tiny_dir):
    """Its shapes a bounded set, as the batches' (docs/serving.md#memory); --pad_to_multiple_of 1: none."""
    for batches, expected in ((64, 16), (1, 1)):
        cfg = ServeConfig(model_dir=str(tiny_dir), pad_to_multiple_of=batches, malloc_trim_interval=0)
        explaining = load_explaining(str(tiny_dir), cfg, "cpu")
        try:
            assert explaining.explainer.pad_to_multiple_of == expected
            tokens = len(explaining.explainer.encode("great film")[0].ids)
            assert tokens + explaining.explainer.padding(tokens) == (16 if expected == 16 else tokens)
        finally:
            explaining.close()
