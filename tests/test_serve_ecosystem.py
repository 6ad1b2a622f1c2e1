"""Serving that speaks the ecosystem's language (issue 15): Text Embeddings Inference's /predict body
and answer, the Hub's POST / (with the real huggingface_hub.InferenceClient against a live server),
Prometheus metrics named as TEI's, TEI's timing headers, and a request id in every log line.

The expected TEI answers are written from TEI's source and docs (router/src/http/types.rs and
server.rs, core/src/tokenization.rs, docs/source/en/quick_tour.md); the expected scores come from the
model run directly through transformers, one text at a time, never from the server under test.
"""

import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal, Optional

import httpx
import pandas as pd
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, StrictBool, StrictInt, create_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conftest import free_port, pydantic_says, server_process
from models import IMDB_TEST
from serve.app import ServeConfig, create_app, validate_config
from serve.batching import BatchWorker, Limits
from serve.classifier import Classifier
from fastapi.testclient import TestClient

MAX_LENGTH = 64  # the tiny model's limit, in tokens (conftest's tiny_dir)
TIMING_HEADERS = ("x-compute-type", "x-compute-time", "x-compute-characters", "x-compute-tokens", "x-total-time",
                  "x-tokenization-time", "x-queue-time", "x-inference-time")  # TEI's router/src/lib.rs


# -----------------------------------------------------------------------------
# fixtures and references


def serve(model_dir, load_classifier=Classifier, **overrides):
    cfg = validate_config(ServeConfig(model_dir=str(model_dir), **overrides))
    return TestClient(create_app(cfg, load_classifier), raise_server_exceptions=False)


def wait_ready(client, timeout=60):
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(tiny_dir):
    with serve(tiny_dir) as c:
        wait_ready(c)
        yield c


class Reference:
    """The model through transformers, one text at a time: what every answer is checked against."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def ids(self, text, side="right"):
        """[CLS] + the content tokens that fit, kept from the beginning (right) or the end (left) + [SEP]."""
        content = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = MAX_LENGTH - 2
        kept = content[:room] if side == "right" else content[max(len(content) - room, 0):]
        return [self.tokenizer.cls_token_id, *kept, self.tokenizer.sep_token_id]

    @torch.inference_mode()
    def logits(self, text, side="right"):
        return self.model(input_ids=torch.tensor([self.ids(text, side)])).logits[0].tolist()

    def probs(self, text, side="right"):
        return torch.tensor(self.logits(text, side)).softmax(-1).tolist()

    def tei(self, text, side="right", raw=False):
        """TEI's answer for one input: every label with its score, highest first."""
        scores = self.logits(text, side) if raw else self.probs(text, side)
        return sorted(({"score": s, "label": label} for s, label in zip(scores, self.labels)),
                      key=lambda p: p["score"], reverse=True)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return Reference(tiny_dir)


def assert_same_predictions(got, want, atol=1e-5):
    """Same labels in the same order, scores within atol."""
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert all(math.isclose(g["score"], w["score"], abs_tol=atol) for g, w in zip(got, want)), (got, want)


def post(client, path, body, status=200):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    return response


# -----------------------------------------------------------------------------
# TEI's /predict: answers


def test_tei_one_input_answers_a_list_sorted_by_score(client, ref):
    """TEI's README example body; the answer is TEI's PredictResponse::Single: [{"score", "label"}, ...]."""
    answer = post(client, "/predict", {"inputs": "I like you."}).json()
    assert [list(p) for p in answer] == [["score", "label"]] * 2  # TEI's field order
    assert answer[0]["score"] >= answer[1]["score"]
    assert_same_predictions(answer, ref.tei("I like you."))
    assert math.isclose(sum(p["score"] for p in answer), 1.0, abs_tol=1e-6)
    # ["text"] is one input too in TEI (a list of one string is not a batch)
    assert post(client, "/predict", {"inputs": ["I like you."]}).json() == answer


def test_tei_batch_answers_one_list_per_input(client, ref):
    """TEI's quick-tour batch: a list of one-string lists; PredictResponse::Batch, in input order."""
    texts = ["I like you.", "I hate pineapples", "the plot was dull and far too long"]
    answer = post(client, "/predict", {"inputs": [[text] for text in texts]}).json()
    assert len(answer) == 3
    for got, text in zip(answer, texts):
        assert_same_predictions(got, ref.tei(text))
    assert len({round(got[0]["score"], 4) for got in answer}) == 3  # three different answers, not a constant


def test_tei_raw_scores_are_the_logits(client, ref):
    text = "a wonderful story, superb acting"
    raw = post(client, "/predict", {"inputs": text, "raw_scores": True}).json()
    assert_same_predictions(raw, ref.tei(text, raw=True))
    assert not math.isclose(sum(p["score"] for p in raw), 1.0, abs_tol=1e-3)  # not probabilities
    batch = post(client, "/predict", {"inputs": [[text]], "raw_scores": True}).json()
    assert batch == [raw]


def test_tei_blank_text_is_classified_as_tei_does(client, ref):
    """TEI refuses only an empty string; a blank one tokenizes to [CLS] [SEP] and gets scores."""
    assert_same_predictions(post(client, "/predict", {"inputs": " \n\t"}).json(), ref.tei(" \n\t"))


# -----------------------------------------------------------------------------
# TEI's /predict: truncation


LONG = "great " * 40 + "awful " * 40  # 80 tokens + 2 specials: over the 64 the tiny model takes


def test_tei_truncates_by_default_and_from_the_side_asked(client, ref):
    assert len(ref.tokenizer(LONG)["input_ids"]) == 82
    right = post(client, "/predict", {"inputs": LONG}).json()  # truncate unset: TEI's --auto-truncate default
    assert_same_predictions(right, ref.tei(LONG, "right"))
    assert post(client, "/predict", {"inputs": LONG, "truncate": None}).json() == right
    assert post(client, "/predict", {"inputs": LONG, "truncate": True, "truncation_direction": "Right"}).json() == right
    left = post(client, "/predict", {"inputs": LONG, "truncation_direction": "Left"}).json()
    assert_same_predictions(left, ref.tei(LONG, "left"))
    assert post(client, "/predict", {"inputs": LONG, "truncation_direction": "left"}).json() == left  # TEI's alias
    # The two sides keep different words: 22 "awful" at the right end, 22 "great" at the left end.
    assert ref.ids(LONG, "left")[1:-1] != ref.ids(LONG, "right")[1:-1]
    assert abs(left[0]["score"] - right[0]["score"]) > 1e-3 or left[0]["label"] != right[0]["label"]
    assert post(client, "/", {"inputs": LONG}).json() == [[{"label": p["label"], "score": p["score"]} for p in right]]


def test_tei_truncate_false_refuses_a_text_over_the_limit_as_tei_does(client, ref):
    """TEI (core/src/tokenization.rs): over max_input_length tokens without truncation is a Validation
    error, 422. At the limit exactly, it is classified."""
    refused = post(client, "/predict", {"inputs": LONG, "truncate": False}, status=422).json()
    assert refused["error_type"] == "Validation"
    assert refused["error"].startswith("Input validation error: `inputs` must have at most 64 tokens, inputs has 82.")
    in_batch = post(client, "/predict", {"inputs": [["fine"], [LONG]], "truncate": False}, status=422).json()
    assert "inputs[1] has 82" in in_batch["error"]
    exactly = "great " * 62  # 62 + 2 specials = 64 tokens
    assert len(ref.tokenizer(exactly)["input_ids"]) == MAX_LENGTH
    assert_same_predictions(post(client, "/predict", {"inputs": exactly, "truncate": False}).json(), ref.tei(exactly))


# -----------------------------------------------------------------------------
# TEI's /predict: refusals, with TEI's status codes and error body


def test_tei_pairs_are_refused_with_the_batch_form_in_the_message(client):
    """["a", "b"] is a pair in TEI (types.rs: Sequence::Pair), for cross-encoders; this model takes one text."""
    for body, where in [({"inputs": ["I like you.", "I hate you."]}, "inputs"),
                        ({"inputs": [["fine"], ["I like you.", "I hate you."]]}, "inputs[1]")]:
        refused = post(client, "/predict", body, status=422).json()
        assert refused["error_type"] == "Validation"
        assert refused["error"].startswith(f"{where} is a pair of texts")
        assert '{"inputs": [["first text"], ["second text"]]}' in refused["error"]
    three = post(client, "/predict", {"inputs": ["a", "b", "c"]}, status=422).json()
    assert three["error"].startswith("inputs holds 3 strings") and "[[" in three["error"]


DIRECTION = Literal["Right", "Left", "right", "left"]  # as in serve/ecosystem.py's TeiRequest

TEI_REFUSALS = [
    ({"inputs": ""}, 400, "Empty", "Input validation error: `inputs` cannot be empty"),
    ({"inputs": [["ok"], [""]]}, 400, "Empty", "Input validation error: `inputs` cannot be empty (inputs[1]"),
    ({"inputs": [["x"]] * 33}, 422, "Validation", "batch size 33 > maximum allowed batch size 32"),  # TEI's words
    ({"inputs": "x" * 100_001}, 422, "Validation", "Input validation error: `inputs` must have at most 100000 characters"),
    ({"inputs": []}, 422, "Validation", "inputs must be a string, or a batch"),
    ({"inputs": 5}, 422, "Validation", "inputs must be a string, or a batch"),
    ({"inputs": [[]]}, 422, "Validation", "inputs[0] holds 0 strings"),
    ({"inputs": "x", "raw_scores": "yes"}, 422, "Validation", f"raw_scores: {pydantic_says(StrictBool, 'yes')}"),
    ({"inputs": "x", "truncation_direction": "Middle"}, 422, "Validation",
     f"truncation_direction: {pydantic_says(DIRECTION, 'Middle')}"),
    ({"inputs": "x", "normalize": True}, 422, "Validation", "unknown field 'normalize': TEI's API takes 'inputs'"),
    ({"inputs": "x", "text": "y"}, 422, "Validation", 'send exactly one of "text" (a string), "texts" (a list'),
]


@pytest.mark.parametrize("body,status,error_type,message", TEI_REFUSALS, ids=[m[:40] for *_, m in TEI_REFUSALS])
def test_tei_refusals(client, body, status, error_type, message):
    response = post(client, "/predict", body, status=status)
    assert list(response.json()) == ["error", "error_type"]
    assert response.json()["error_type"] == error_type
    assert message in response.json()["error"]


def test_tei_overloaded_and_unhealthy(tiny_dir):
    """429 "Overloaded" when the queue is full, 503 "Unhealthy" while the model loads (TEI's ErrorType)."""
    gate, loaded = threading.Event(), threading.Event()

    def gated(model_dir, limits, device):
        loaded.wait(30)
        classifier = Classifier(model_dir, limits, device)
        predict_fn = classifier.worker.predict_fn
        classifier.worker.predict_fn = lambda ids: (gate.wait(30), predict_fn(ids))[1]
        return classifier

    with serve(tiny_dir, gated, max_queue=32) as c:
        loading = post(c, "/predict", {"inputs": "too early"}, status=503).json()
        assert loading == {"error": "the model is still loading; retry in a few seconds.", "error_type": "Unhealthy"}
        loaded.set()
        wait_ready(c)
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(c.post, "/predict", json={"inputs": [["great film"]] * 32})  # fills the queue
            worker = c.app.state.model.classifier.worker
            while worker.waiting < 32:
                time.sleep(0.01)
            refused = c.post("/predict", json={"inputs": "one more"})
            gate.set()
            assert first.result().status_code == 200 and len(first.result().json()) == 32
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")
    assert refused.json()["error_type"] == "Overloaded"
    assert refused.json()["error"].startswith("Model is overloaded: 32 texts are already waiting")


def test_our_body_and_answer_are_unchanged(client, ref):
    answer = post(client, "/predict", {"text": "I like you."}).json()
    assert list(answer) == ["predictions"] and list(answer["predictions"][0]) == ["label", "score", "scores"]
    assert answer["predictions"][0]["scores"] == pytest.approx(dict(zip(ref.labels, ref.probs("I like you."))), abs=1e-6)
    blank = post(client, "/predict", {"text": "  "}, status=422).json()  # ours still refuses blank texts
    assert blank["error_type"] == "Validation" and "empty or whitespace only" in blank["error"]
    too_many = post(client, "/predict", {"texts": ["x"] * 33}, status=413).json()  # and answers 413 for sizes
    assert too_many == {"error": "33 texts in one request; the limit is 32. Send several requests.",
                        "error_type": "Validation"}


def test_schema_describes_tei_body_and_the_hub_route(tiny_dir):
    with serve(tiny_dir, max_inputs=8, max_chars=500) as c:
        schema = c.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    tei = components["TeiRequest"]
    assert (tei["required"], tei["additionalProperties"]) == (["inputs"], False)
    assert tei["properties"]["truncation_direction"]["enum"] == ["Right", "Left", "right", "left"]
    assert tei["properties"]["raw_scores"]["type"] == "boolean"
    text = {"type": "string", "minLength": 1, "maxLength": 500}
    one, forms = {"type": "array", "items": text, "minItems": 1, "maxItems": 1}, tei["properties"]["inputs"]["oneOf"]
    assert [{k: v for k, v in form.items() if k != "description"} for form in forms] == [
        text, one, {"type": "array", "items": one, "minItems": 1, "maxItems": 8}]  # no pair forms: refused
    assert components["ErrorResponse"]["required"] == ["error", "error_type"]
    assert components["ErrorType"]["enum"] == ["Unhealthy", "Backend", "Overloaded", "Validation", "Empty"]
    answers = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answers["anyOf"] == [{"$ref": "#/components/schemas/PredictResponse"},
                                {"type": "array", "items": {"$ref": "#/components/schemas/TeiPrediction"}},
                                {"type": "array", "items": {"type": "array",
                                                            "items": {"$ref": "#/components/schemas/TeiPrediction"}}}]
    hub = schema["paths"]["/"]
    assert set(hub) == {"get", "post"}
    assert components["HubParameters"]["properties"]["function_to_apply"]["anyOf"][0]["enum"] == [
        "sigmoid", "softmax", "none"]
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


# -----------------------------------------------------------------------------
# the Hub's POST /


def test_hub_body_answers_a_list_per_input(client, ref):
    """The Inference API's text-classification answer: [[{"label", "score"}, ...]] for one string."""
    text = "I loved it, the best film"
    want = [{"label": p["label"], "score": p["score"]} for p in ref.tei(text)]
    answer = post(client, "/", {"inputs": text, "parameters": {}}).json()  # what InferenceClient sends
    assert [list(p) for p in answer[0]] == [["label", "score"]] * 2
    assert_same_predictions(answer[0], want)
    assert post(client, "/", {"inputs": text}).json() == answer
    assert post(client, "/", {"inputs": text, "parameters": {"top_k": 1}}).json() == [answer[0][:1]]
    assert post(client, "/", {"inputs": text, "parameters": {"top_k": 5}}).json() == answer  # k > labels: all
    logits = post(client, "/", {"inputs": text, "parameters": {"function_to_apply": "none"}}).json()[0]
    assert_same_predictions(logits, [{"label": p["label"], "score": p["score"]} for p in ref.tei(text, raw=True)])
    sigmoid = post(client, "/", {"inputs": text, "parameters": {"function_to_apply": "sigmoid"}}).json()[0]
    assert [p["score"] for p in sigmoid] == pytest.approx([1 / (1 + math.exp(-p["score"])) for p in logits], abs=1e-6)
    two = post(client, "/", {"inputs": [text, "dull and boring"]}).json()
    assert len(two) == 2
    assert_same_predictions(two[0], answer[0], atol=1e-6)  # one batch of two: the same but for float rounding
    assert_same_predictions(two[1], [{"label": p["label"], "score": p["score"]} for p in ref.tei("dull and boring")])
    assert client.get("/").headers["content-type"] == "text/html; charset=utf-8"  # the page is still there


@pytest.mark.parametrize("body,status,message", [
    ({"inputs": ""}, 400, "Input validation error: `inputs` cannot be empty"),
    ({"inputs": "x", "parameters": {"top_k": 0}}, 422,
     f"parameters.top_k: {pydantic_says(Optional[Annotated[StrictInt, Field(ge=1)]], 0)}"),
    ({"inputs": "x", "parameters": {"function_to_apply": "relu"}}, 422,
     f"parameters.function_to_apply: {pydantic_says(Optional[Literal['sigmoid', 'softmax', 'none']], 'relu')}"),
    ({"inputs": "x", "parameters": {"k": 1}}, 422, "unknown field 'k': 'parameters' takes 'top_k' and 'function_to_apply'"),
    ({"inputs": "x", "options": {}}, 422, "unknown field 'options': POST / takes 'inputs' and 'parameters'"),
    ({"inputs": ["x"] * 33}, 422, "batch size 33 > maximum allowed batch size 32"),
    ({}, 422, f"inputs: {pydantic_says(create_model('HubBody', inputs=(str, ...)), {})}"),
    ({"inputs": [1]}, 422, "inputs must be a string, or a non-empty list of strings"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hub_refusals(client, body, status, message):
    response = post(client, "/", body, status=status)
    assert message in response.json()["error"], response.json()


def test_methods_at_the_root_are_get_and_post(client):
    """Two routes share "/": a 405 names both methods (Starlette alone would name the first route's)."""
    response = client.delete("/")
    assert (response.status_code, response.headers["allow"]) == (405, "GET, POST")


# -----------------------------------------------------------------------------
# metrics, timing headers, request ids


def scrape(client):
    """/metrics parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def moved(before, after):
    """The samples that changed, by how much (histogram buckets left out: their sums and counts stay)."""
    return {key: after[key] - before.get(key, 0) for key in after
            if after[key] != before.get(key, 0) and not key[0].endswith("_bucket")}


def test_metrics_move_by_exactly_the_requests_sent(tiny_dir, ref):
    texts = ["great film", "awful boring movie", "the music was good " * 30]  # the last one truncated at 64
    tokens = [len(ref.ids(text)) for text in texts]
    assert tokens[2] == MAX_LENGTH
    with serve(tiny_dir) as c:
        wait_ready(c)
        before = scrape(c)
        post(c, "/predict", {"text": texts[0]})  # ours, single
        post(c, "/predict", {"texts": texts[:2]})  # ours, batch
        post(c, "/predict", {"inputs": [[texts[1]], [texts[2]]]})  # TEI, batch
        post(c, "/", {"inputs": texts[2]})  # the Hub, single
        post(c, "/predict", {"inputs": ""}, status=400)  # TEI, refused: validation
        post(c, "/predict", {"inputs": [["x"]] * 33}, status=422)  # refused: batch_size
        post(c, "/predict", {"inputs": LONG, "truncate": False}, status=422)  # refused: tokenization
        post(c, "/predict", {"txt": "x"}, status=422)  # not parsed: HTTP counter only, as in TEI
        c.get("/nope")
        after = scrape(c)
        assert after[("te_queue_size", ())] == 0
    delta = moved(before, after)
    durations = {key: delta.pop(key) for key in list(delta) if key[0].endswith("duration_sum")}
    assert set(durations) == {(f"te_request_{name}_sum", ()) for name in DURATIONS} and min(durations.values()) > 0
    batches = delta.pop(("te_batch_next_size_count", ()))
    assert 4 <= batches <= 6 and delta.pop(("te_batch_next_tokens_count", ())) == batches  # a request per batch, or two
    classified = 1 + 2 + 2 + 1
    classified_tokens = tokens[0] + (tokens[0] + tokens[1]) + (tokens[1] + tokens[2]) + tokens[2]
    assert delta == {
        http("/predict", "200"): 3, http("/", "200"): 1, http("/predict", "400"): 1, http("/predict", "422"): 3,
        http("/metrics", "200", "GET"): 1,  # the first scrape, counted once answered
        http("unmatched", "404", "GET"): 1,  # an unknown path: one label for all of them
        ("te_request_count_total", (("method", "single"),)): 4, ("te_request_count_total", (("method", "batch"),)): 3,
        ("te_request_success_total", (("method", "single"),)): 2, ("te_request_success_total", (("method", "batch"),)): 2,
        ("te_request_failure_total", (("err", "validation"),)): 1, ("te_request_failure_total", (("err", "batch_size"),)): 1,
        ("te_request_failure_total", (("err", "tokenization"),)): 1,
        ("te_predict_success_total", ()): classified, ("serve_tokens_classified_total", ()): classified_tokens,
        ("te_request_input_length_count", ()): classified, ("te_request_input_length_sum", ()): classified_tokens,
        **{(f"te_request_{name}_count", ()): 4 for name in DURATIONS},  # the four answered requests
        ("te_batch_next_size_sum", ()): classified, ("te_batch_next_tokens_sum", ()): classified_tokens,
    }


DURATIONS = ("duration", "tokenization_duration", "queue_duration", "inference_duration")


def http(route, status, method="POST"):
    return "serve_http_requests_total", (("method", method), ("route", route), ("status", status))


def test_a_failing_metrics_hook_never_stops_the_worker(caplog):
    def broken_hook(texts, seconds):
        raise KeyError("a bug in a metric")

    worker = BatchWorker(lambda texts: torch.ones(len(texts), 2), Limits(), on_batch=broken_hook)
    with caplog.at_level(logging.ERROR, logger="batching"):
        assert worker.submit(["a"]).result(timeout=10) == [[1.0, 1.0]]
        assert worker.submit(["b", "c"]).result(timeout=10) == [[1.0, 1.0]] * 2  # still serving
    worker.close()
    assert [r.getMessage() for r in caplog.records] == ["on_batch failed; the batch's answers are not affected"] * 2


def test_time_in_queue_and_in_the_model_are_told_apart(tiny_dir):
    """A request queued behind a held batch waits >= 0.3 s, then runs >= 0.2 s: the headers (TEI's names,
    integer ms) and the histograms say which is which."""
    entered, gate = threading.Event(), threading.Event()

    def slow(model_dir, limits, device):
        classifier = Classifier(model_dir, limits, device)
        predict_fn = classifier.worker.predict_fn

        def held(ids):
            entered.set()
            gate.wait(30)
            time.sleep(0.2)
            return predict_fn(ids)

        classifier.worker.predict_fn = held
        return classifier

    with serve(tiny_dir, slow) as c:
        wait_ready(c)
        before = scrape(c)
        with ThreadPoolExecutor(max_workers=2) as pool:
            first = pool.submit(post, c, "/predict", {"inputs": "great film"})
            entered.wait(10)  # the first request is in the model
            queued = pool.submit(post, c, "/predict", {"inputs": "the plot was dull"})
            worker = c.app.state.model.classifier.worker
            while worker.queued() < 1:
                time.sleep(0.01)
            assert scrape(c)[("te_queue_size", ())] == 1  # the queue depth, read at the scrape
            time.sleep(0.3)
            gate.set()
            first, queued = first.result(), queued.result()
        after = scrape(c)
    ms = {name: int(queued.headers[name]) for name in TIMING_HEADERS if name != "x-compute-type"}
    assert queued.headers["x-compute-type"] == "cpu"
    assert ms["x-queue-time"] >= 300 and ms["x-inference-time"] >= 200
    assert ms["x-total-time"] == ms["x-compute-time"]
    assert ms["x-total-time"] >= ms["x-tokenization-time"] + ms["x-queue-time"] + ms["x-inference-time"]
    assert (ms["x-compute-characters"], ms["x-compute-tokens"]) == (len("the plot was dull"), 6)  # 4 words + 2
    assert int(first.headers["x-queue-time"]) < 100 and int(first.headers["x-inference-time"]) >= 500
    delta = moved(before, after)
    assert delta[("te_request_queue_duration_count", ())] == 2
    assert delta[("te_request_queue_duration_sum", ())] >= 0.3
    assert delta[("te_request_inference_duration_sum", ())] >= 0.5 + 0.2


def test_request_id_is_echoed_or_made_and_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="access"):
        given = client.post("/predict", json={"inputs": "great"}, headers={"x-request-id": "job-7.batch:3"})
        made = client.post("/predict", json={"inputs": "great"})
        refused = client.post("/predict", json={"inputs": ""}, headers={"x-request-id": "two words"})
    assert given.headers["x-request-id"] == "job-7.batch:3"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])  # not a plain token: replaced
    lines = [record.getMessage() for record in caplog.records if record.name == "access"]
    assert len(lines) == 3
    assert re.fullmatch(r'testclient:\d+ "POST /predict HTTP/1.1" 200 \d+\.\d ms request_id=job-7\.batch:3', lines[0])
    assert lines[1].endswith(f"request_id={made.headers['x-request-id']}")
    assert ' 400 ' in lines[2] and lines[2].endswith(f"request_id={refused.headers['x-request-id']}")


def test_access_log_false_logs_no_line_but_still_sends_the_id(tiny_dir, caplog):
    with serve(tiny_dir, access_log=False) as c, caplog.at_level(logging.INFO, logger="access"):
        wait_ready(c)
        answer = c.post("/predict", json={"inputs": "great"}, headers={"x-request-id": "quiet-1"})
    assert answer.headers["x-request-id"] == "quiet-1"
    assert [r for r in caplog.records if r.name == "access"] == []


# -----------------------------------------------------------------------------
# live servers: the real InferenceClient, pipeline() as the reference, the log of each command


def test_inference_client_gets_pipeline_labels_and_scores(minilm_dir, tmp_path):
    """huggingface_hub.InferenceClient(base_url=...).text_classification against `python -m serve`:
    the labels and scores of pipeline("text-classification", top_k=None), to 1e-5, best first."""
    reviews = pd.read_parquet(IMDB_TEST)["text"]
    lengths = reviews.str.len()
    texts = (["great film", "Dull and far too long."] + reviews[lengths < 400].head(4).tolist()
             + reviews[lengths > 4000].head(2).tolist())  # over 512 tokens: truncated
    pipe = pipeline("text-classification", model=str(minilm_dir), top_k=None, truncation=True)
    port = free_port()
    args = ["-m", "serve", "--model_dir", str(minilm_dir), "--port", str(port)]
    with server_process(args, port, tmp_path / "server.log") as url:
        hub = InferenceClient(base_url=url)
        answers = [hub.text_classification(text) for text in texts]
        best = hub.text_classification(texts[0], top_k=1)
        with pytest.raises(HfHubHTTPError) as refused:
            hub.text_classification("")
        tei = httpx.post(url + "/predict", json={"inputs": [[text] for text in texts], "raw_scores": True},
                         headers={"x-request-id": "tei-batch-1"})
    for got, want in zip(answers, pipe(texts)):
        assert [e.label for e in got] == [w["label"] for w in want]
        assert [e.score for e in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    assert len({answer[0].label for answer in answers}) == 2  # both labels occur: not a constant
    assert [(e.label, e.score) for e in best] == [(answers[0][0].label, answers[0][0].score)]
    assert refused.value.response.status_code == 400
    assert refused.value.response.json()["error_type"] == "Empty"
    logits = pipeline("text-classification", model=str(minilm_dir), top_k=None, truncation=True,
                      function_to_apply="none")(texts)
    for got, want in zip(tei.json(), logits):
        assert [p["label"] for p in got] == [w["label"] for w in want]
        assert [p["score"] for p in got] == pytest.approx([w["score"] for w in want], abs=1e-5)
    log = (tmp_path / "server.log").read_text()
    # Each of the client's requests has its line, with an id of its own (how many POSTs the client
    # sends per call is huggingface_hub's business: at least one each).
    ids = re.findall(r'"POST / HTTP/1.1" 200 [\d.]+ ms request_id=([0-9a-f]{32})', log)
    assert len(ids) >= len(texts) + 1 and len(set(ids)) == len(ids), log[-3000:]
    assert len(re.findall(r'"POST /predict HTTP/1.1" 200 [\d.]+ ms request_id=tei-batch-1\n', log)) == 1, log[-3000:]
    assert '"POST / HTTP/1.1" 200 OK' not in log  # uvicorn's own access line is off: one line per request


def test_uvicorn_factory_logs_each_request_with_its_id(tiny_dir, tmp_path):
    """Under `uvicorn serve.app:app_from_env --factory` the app's own lines show too (its factory sets
    up logging), and --no-access-log leaves ours as the one line per request."""
    port = free_port()
    factory = ["-m", "uvicorn", "serve.app:app_from_env", "--factory", "--port", str(port), "--no-access-log"]
    with server_process(factory, port, tmp_path / "server.log", env={"SERVE_MODEL_DIR": str(tiny_dir)}) as url:
        answer = httpx.post(url + "/predict", json={"inputs": "great film"}, headers={"x-request-id": "factory-1"})
        with httpx.Client(base_url=url) as live:
            metrics = scrape(live)
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "factory-1"
    log = (tmp_path / "server.log").read_text()
    assert "loaded and warmed up" in log
    assert len(re.findall(r'"POST /predict HTTP/1.1" 200 [\d.]+ ms request_id=factory-1', log)) == 1
    assert metrics[("te_request_success_total", (("method", "single"),))] == 1
