"""The web app's API (serve/app.py), its batching worker and serve/predict.py, on a tiny random BERT (fast) and on
minilm-l6 with a 2-label head (real weights: equality with transformers.pipeline)."""

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import StrictStr
from transformers import (BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, pipeline)

import serve.app as app_module
import serve.predict as predict_module
from conftest import free_port, pydantic_says, server_process, usage_error
import model_utils
from model_utils import classify, count_parameters, load_for_inference
from models import IMDB_TEST, ROOT, tiny_bert_config
from serve.app import ServeConfig, create_app, parse_config, validate_config
from serve.batching import BatchWorker, InputError, Limits, Overloaded, check_texts
from serve.classifier import Classifier, Text, classify_by_length, split_by_length
from serve.packed import PACKED_ATTENTION, can_pack, classify_packed, use_packed_attention

UNICODE_TEXTS = [
    "I loved it 😍🎬👍🏽 best film of the year 🏆",
    "שלום, הסרט היה נהדר — هذا الفيلم رائع جدا",  # right-to-left scripts
    "Cafe\u0301 scene: Z\u0335\u0321a\u0336\u0322l\u0334\u0327g\u0337\u0328o text",  # combining marks
    "nul\x00 and control \x01\x07\x1b[31m chars\x7f, zero\u200bwidth, bom\ufeff",
    "\x00",  # nothing but a control character: tokenizes to [CLS] [SEP], still a prediction
    "日本語のレビュー：とても面白かった。",
]


# -----------------------------------------------------------------------------
# fixtures


def wait_ready(client, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/health').json()}")


def serve(model_dir, load_classifier=Classifier, **overrides):
    """A TestClient around a fresh app, entered (lifespan started); the caller waits if it wants."""
    cfg = validate_config(ServeConfig(model_dir=str(model_dir), **overrides))
    return TestClient(create_app(cfg, load_classifier), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_dir):
    with serve(tiny_dir) as c:
        wait_ready(c)
        yield c


def predict(client, **body):
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def probs(predictions):
    return [[p["scores"]["neg"], p["scores"]["pos"]] for p in predictions]


def assert_close(got, want, atol=1e-5):
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=atol)


def single_row_probs(model_dir, texts):
    """Reference: each text alone through model_utils.classify (no batching, no padding)."""
    model, tokenizer = load_for_inference(str(model_dir))
    return [classify(model, tokenizer, [text])[0].tolist() for text in texts]


# -----------------------------------------------------------------------------
# routes


def test_predict_one_text_shape_and_values(client, tiny_dir):
    (p,) = predict(client, text="A wonderful film, the cast is superb.")
    assert list(p) == ["label", "score", "scores"]
    assert list(p["scores"]) == ["neg", "pos"]  # the model's id2label order
    assert math.isclose(sum(p["scores"].values()), 1.0, abs_tol=1e-6)
    assert p["score"] == max(p["scores"].values())
    assert p["label"] == max(p["scores"], key=p["scores"].get)
    (expected,) = single_row_probs(tiny_dir, ["A wonderful film, the cast is superb."])
    assert p["scores"]["neg"] == pytest.approx(expected[0], abs=1e-6)


def test_batch_keeps_input_order(client, tiny_dir):
    texts = ["great film", "awful boring movie", "the plot was dull", "i loved it", "zzz qqq",
             "best acting ever", "a", "worst waste of time " * 5, "the music was good"]
    predictions = predict(client, texts=texts)
    expected = single_row_probs(tiny_dir, texts)
    assert_close(probs(predictions), expected)
    assert [p["label"] for p in predictions] == [["neg", "pos"][int(row[1] > row[0])] for row in expected]
    assert len({round(row[1], 4) for row in expected}) >= 5  # the texts really score differently


def test_health_is_503_until_loaded_and_warm(tiny_dir):
    gate = threading.Event()

    def slow_load(model_dir, limits, device):
        gate.wait(30)
        return Classifier(model_dir, limits, device)

    with serve(tiny_dir, slow_load) as c:
        loading = c.get("/health")
        assert loading.status_code == 503
        assert loading.json() == {"error": "the model is loading.", "error_type": "Unhealthy"}  # TEI's error type
        early = c.post("/predict", json={"text": "too early"})
        assert early.status_code == 503 and "loading" in early.json()["error"]
        assert c.get("/info").json()["ready"] is False
        gate.set()
        wait_ready(c)
        assert c.get("/health").json() == {"status": "ok"}


def test_health_says_why_loading_failed(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # config but no weights
    with serve(broken) as c:
        deadline = time.monotonic() + 30
        while "failed" not in c.get("/health").json()["error"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = c.get("/health")
        assert health.status_code == 503
        assert "no .safetensors weights" in health.json()["error"]
        assert c.post("/predict", json={"text": "hello"}).status_code == 503


def test_info(tiny_dir, tmp_path):
    model_dir = tmp_path / "fine-tuned-bert"
    shutil.copytree(tiny_dir, model_dir)
    results = {"eval_accuracy": 0.91, "eval_loss": 0.25, "epoch": 2.0}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "eval_results.json").write_text(json.dumps(results))  # where train_loop.py writes it
    with serve(model_dir) as c:
        wait_ready(c)
        info = c.get("/info").json()
    model, _ = load_for_inference(str(tiny_dir))
    assert info["model_dir"] == str(model_dir)
    assert info["labels"] == ["neg", "pos"]
    assert info["max_length"] == 64
    assert info["num_parameters"] == count_parameters(model)
    assert info["eval_results"] == results
    assert info["eval_results_path"] == str(tmp_path / "results" / "eval_results.json")
    assert info["packed"] is True  # a BERT model on a CPU
    assert info["limits"] == {"max_inputs": 32, "max_chars": 100_000, "max_batch_size": 32, "max_wait_ms": 5.0,
                              "max_queue": 512, "packed": True, "dtype": None, "forward_cost_tokens": None,
                              "pad_to_multiple_of": 64, "malloc_trim_interval": 10.0, "max_body_bytes": 2 * 1024 * 1024}
    assert (info["device"], info["dtype"]) == ("cpu", "float32")  # --dtype unset: float32 on a CPU
    assert info["device_name"] == model_utils.device_name("cpu") and info["device_name"]


def test_info_eval_results_beside_the_model_win(tiny_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "eval_results.json").write_text('{"eval_accuracy": 0.5}')
    cfg = validate_config(ServeConfig(model_dir=str(model_dir)))
    assert app_module.find_eval_results(cfg) == (str(model_dir / "eval_results.json"), {"eval_accuracy": 0.5})
    cfg.eval_results = str(tmp_path / "missing.json")
    assert app_module.find_eval_results(cfg) == (None, None)


def test_page_and_docs_need_nothing_from_outside(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('<textarea id="review"', 'id="analyze"', "Ctrl+Enter", "data-example", 'name="viewport"'):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no web fonts
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower()
    # Swagger UI's scripts (wherever fastapi_offline puts them) come from this server, and it serves them.
    scripts = re.findall(r"""<script[^>]*\ssrc=["']([^"']+)["']""", docs.text)
    assert any(src.endswith(".js") for src in scripts), docs.text
    for src in scripts:
        assert src.startswith("/") and not src.startswith("//"), src
        assert client.get(src).status_code == 200, src
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/info"} <= set(schema["paths"])


def test_openapi_schema_says_exactly_what_predict_accepts_and_answers(tiny_dir):
    """One of {"text"}, {"texts"} or TEI's {"inputs"}, never two; the limits of this server's flags; every
    status it answers. (TEI's shape in detail: tests/test_serve_ecosystem.py.)"""
    with serve(tiny_dir, max_inputs=8, max_chars=500) as c:
        schema = c.get("/openapi.json").json()
    predict_op = schema["paths"]["/predict"]["post"]
    body = predict_op["requestBody"]["content"]["application/json"]["schema"]
    assert body["oneOf"] == [{"$ref": "#/components/schemas/OneText"}, {"$ref": "#/components/schemas/ManyTexts"},
                             {"$ref": "#/components/schemas/TeiRequest"}]
    one, many = (schema["components"]["schemas"][name] for name in ("OneText", "ManyTexts"))
    assert (one["required"], one["additionalProperties"], many["required"], many["additionalProperties"]) == (
        ["text"], False, ["texts"], False)
    assert (one["properties"]["text"]["type"], one["properties"]["text"]["maxLength"]) == ("string", 500)
    assert one["properties"]["text"]["pattern"] == r"\S"  # not blank
    texts = many["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"]) == (1, 8, 500)
    assert set(predict_op["responses"]) == {"200", "400", "413", "422", "429", "503"}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    assert all(predict_op["responses"][code]["content"]["application/json"]["schema"] == error_ref
               for code in ("400", "413", "422", "429", "503"))
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "503"}


# -----------------------------------------------------------------------------
# equality with transformers.pipeline (real weights, real reviews, truncation, padding, Unicode)


def test_predictions_equal_pipeline(minilm_dir):
    reviews = pd.read_parquet(IMDB_TEST)["text"]
    lengths = reviews.str.len()
    texts = (reviews[lengths < 400].head(6).tolist()  # short
             + reviews[lengths > 4000].head(3).tolist()  # > 512 tokens: truncated
             + UNICODE_TEXTS)
    pipe = pipeline("text-classification", model=str(minilm_dir), top_k=None, truncation=True)
    expected = [{r["label"]: r["score"] for r in out} for out in pipe(texts)]
    with serve(minilm_dir) as c:
        wait_ready(c)
        batched = predict(c, texts=texts)  # one padded batch of mixed lengths
        alone = [predict(c, text=text)[0] for text in texts[:3]]
    for got, want in zip(batched + alone, expected + expected[:3]):
        assert_close([got["scores"]["neg"], got["scores"]["pos"]], [want["neg"], want["pos"]])
        assert got["label"] == max(want, key=want.get)
    assert len({p["label"] for p in batched}) == 2  # both classes occur: not a constant


# -----------------------------------------------------------------------------
# bad input: a 4xx with a JSON message, never a 500


BAD_BODIES = [
    ({"texts": []}, 422, "'texts' is empty"),
    ({"texts": ["fine", ""]}, 422, "texts[1] is empty or whitespace only"),
    ({"text": " \n\t\u3000"}, 422, "text is empty or whitespace only"),
    ({"text": 5}, 422, f"text: {pydantic_says(StrictStr, 5)}"),
    ({"text": ["a list"]}, 422, f"text: {pydantic_says(StrictStr, ['a list'])}"),
    ({"texts": "not a list"}, 422, f"texts: {pydantic_says(list[StrictStr], 'not a list')}"),
    ({"texts": ["ok", None]}, 422, f"texts[1]: {pydantic_says(StrictStr, None)}"),
    ({}, 422, 'exactly one of "text"'),
    ({"text": "a", "texts": ["b"]}, 422, 'exactly one of "text"'),
    ({"text": None}, 422, 'exactly one of "text"'),
    ({"txt": "a"}, 422, "unknown field 'txt'"),
    (["a list"], 422, "must be a JSON object"),
    ({"texts": ["x"] * 33}, 413, "33 texts in one request; the limit is 32"),
    ({"text": "x" * 100_001}, 413, "text has 100001 characters; the limit is 100000"),
]


@pytest.mark.parametrize("body,status,message", BAD_BODIES, ids=[m for _, _, m in BAD_BODIES])
def test_bad_json_bodies(client, body, status, message):
    response = client.post("/predict", json=body)
    assert response.status_code == status
    assert list(response.json()) == ["error", "error_type"] and message in response.json()["error"]
    assert response.json()["error_type"] == "Validation"


BAD_RAW = [
    (b'{"text": "unterminated', "application/json", 422, "the body is not valid JSON"),
    (b"", "application/json", 422, "must be a JSON object"),
    (b"text=hello", "application/x-www-form-urlencoded", 422, "must be a JSON object"),
    (b'{"text": "\\ud800 lone surrogate"}', "application/json", 422, "unpaired surrogate"),
    # Not UTF-8: FastAPI refuses it before our code sees it, with a status and words of its own (400 and
    # "There was an error parsing the body" in 0.1xx); ours is that it is a Validation error, in our shape.
    (b'{"text": "\xff\xfe not utf-8"}', "application/json", {400, 422}, "not UTF-8"),
]


@pytest.mark.parametrize("raw,content_type,status,message", BAD_RAW, ids=[m for *_, m in BAD_RAW])
def test_bad_raw_bodies(client, raw, content_type, status, message):
    response = client.post("/predict", content=raw, headers={"content-type": content_type})
    if isinstance(status, set):  # the framework's answer: any client error it chose, a message, our error shape
        assert response.status_code in status, response.text
        assert list(response.json()) == ["error", "error_type"] and response.json()["error"].strip(), response.text
        assert response.json()["error_type"] == "Validation"
        return
    assert response.status_code == status
    assert message in response.json()["error"]


def test_body_over_2mb_is_413_with_or_without_content_length(client):
    body = json.dumps({"text": "x" * (2 * 1024 * 1024)}).encode()
    declared = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "2097152 bytes" in declared.json()["error"]
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # chunked: no Content-Length
    streamed = client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "2097152 bytes" in streamed.json()["error"]


def test_limits_are_inclusive_and_long_reviews_are_truncated(client):
    assert len(predict(client, texts=["x"] * 32)) == 32
    (p,) = predict(client, text="great " * 16_666)  # 99,996 characters: accepted, then cut to 64 tokens
    assert p["label"] in ("neg", "pos")


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/nope").json() == {"error": "Not Found", "error_type": "Validation"}
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "Method Not Allowed", "error_type": "Validation"}


def test_unicode_of_every_kind(client, tiny_dir):
    predictions = predict(client, texts=UNICODE_TEXTS)
    assert_close(probs(predictions), single_row_probs(tiny_dir, UNICODE_TEXTS))


def test_a_bug_is_a_json_500_without_internals(tiny_dir):
    def broken(model_dir, limits, device):
        classifier = Classifier(model_dir, limits, device)
        classifier.worker.predict_fn = lambda texts: 1 / 0  # a genuine bug inside the worker
        return classifier

    with serve(tiny_dir, broken) as c:
        wait_ready(c)
        response = c.post("/predict", json={"text": "hello"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error; the details are in the server's log.",
                               "error_type": "Backend"}


# -----------------------------------------------------------------------------
# concurrency: many clients, one worker, nothing lost or mixed up, 429 beyond the queue


def test_concurrent_clients_get_their_own_results(client, tiny_dir):
    texts = [f"review {i}: " + " ".join(["great", "awful", "dull", "superb", "boring"][j % 5] for j in range(i % 7 + 1))
             for i in range(24)]
    expected = single_row_probs(tiny_dir, texts)
    batches_before = client.get("/info").json()["batches_run"]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda t: predict(client, text=t)[0], texts))
    assert_close(probs(results), expected)
    assert client.get("/info").json()["batches_run"] - batches_before <= len(texts)


def test_overload_is_429_and_nothing_is_dropped(tiny_dir):
    gate = threading.Event()

    def gated(model_dir, limits, device):
        classifier = Classifier(model_dir, limits, device)
        predict_fn = classifier.worker.predict_fn
        classifier.worker.predict_fn = lambda texts: (gate.wait(30), predict_fn(texts))[1]
        return classifier

    with serve(tiny_dir, gated, max_queue=32) as c:
        wait_ready(c)
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = pool.submit(c.post, "/predict", json={"texts": ["great film"] * 32})  # fills the queue
            worker = c.app.state.model.classifier.worker
            while worker.waiting < 32:
                time.sleep(0.01)
            refused = c.post("/predict", json={"text": "one more"})
            gate.set()
            assert first.result().status_code == 200 and len(first.result().json()["predictions"]) == 32
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "32 texts are already waiting" in refused.json()["error"]
        assert c.post("/predict", json={"text": "after the rush"}).status_code == 200


def test_worker_batches_waiting_texts_and_routes_rows():
    seen_batches = []

    def fake_model(texts):  # row = (length, first letter), so a mixed-up row is detectable
        seen_batches.append(list(texts))
        time.sleep(0.02)
        return torch.tensor([[len(t), ord(t[0])] for t in texts], dtype=torch.float64)

    worker = BatchWorker(fake_model, Limits(max_batch_size=8, max_wait_ms=20))
    jobs = [[chr(97 + i) * (i + 1)] * (1 + i % 3) for i in range(20)]  # 20 callers, 1-3 texts each
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = list(pool.map(worker.submit, jobs))
    for texts, future in zip(jobs, futures):
        assert future.result(timeout=10) == [[len(t), ord(t[0])] for t in texts]
    worker.close()
    sizes = [len(b) for b in seen_batches]
    assert sum(sizes) == sum(len(j) for j in jobs) == 39
    assert max(sizes) <= 8 and len(sizes) < 20  # batched, within the limit


def test_split_by_length_trades_padding_against_forward_passes():
    lengths = [30, 40, 50, 60, 90, 95, 100, 120, 125, 126, 127, 128]
    assert split_by_length(lengths, 1_000_000) == [(0, 12)]  # passes expensive (GPU): one batch
    assert split_by_length(lengths, 0) == [(i, i + 1) for i in range(12)]  # padding only: one text each
    # cost 64: 64 + 4*60 + 64 + 3*100 + 64 + 5*128 = 1372 tokens, vs 64 + 12*128 = 1600 in one batch
    assert split_by_length(lengths, 64) == [(0, 4), (4, 7), (7, 12)]
    assert split_by_length([100] * 16, 64) == [(0, 16)]


def token_ids(tokenizer, texts, max_length=64):
    """What the tokenizer thread hands the worker: ids per text, truncated, special tokens included."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def test_classify_by_length_equals_one_padded_batch(tiny_dir):
    model, tokenizer = load_for_inference(str(tiny_dir))
    texts = ["great film " * n for n in (9, 1, 30, 4, 2, 50, 1, 7)]  # 50 repeats: truncated at 64
    chunked = classify_by_length(model, token_ids(tokenizer, texts), tokenizer.pad_token_id,
                                 forward_cost_tokens=0)  # one text per pass
    assert_close(chunked.softmax(-1), classify(model, tokenizer, texts))  # logits; input order kept


def test_packed_batch_equals_padded_batch(tiny_dir):
    model, tokenizer = load_for_inference(str(tiny_dir))
    texts = ["great film " * n for n in (9, 1, 30, 4, 2, 50, 1, 7)] + ["\x00"]  # truncated at 64; [CLS] [SEP]
    padded = classify(model, tokenizer, texts)
    assert use_packed_attention(model) and model.config._attn_implementation == PACKED_ATTENTION
    assert_close(classify(model, tokenizer, texts), padded)  # a padded batch runs as under "sdpa"
    packed = classify_packed(model, token_ids(tokenizer, texts)).softmax(-1)  # logits -> probabilities
    # Equal only if attention stays inside each text, positions restart at 0 and each [CLS] is pooled.
    assert_close(packed, padded)
    assert packed[:, 1].max() - packed[:, 1].min() > 0.05  # the texts score differently: not a constant
    assert_close(classify_packed(model, token_ids(tokenizer, texts[:1])).softmax(-1), padded[:1])  # a batch of one


def test_classifier_packs_bert_batches_on_a_cpu_unless_told_not_to(tiny_dir):
    texts = ["great film " * n for n in (9, 1, 30, 4)]
    for packed in (True, False):
        with Classifier(str(tiny_dir), Limits(packed=packed), "cpu") as classifier:
            assert classifier.packed is packed
            assert_close(probs(classifier.predict(texts)), single_row_probs(tiny_dir, texts))

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64)
    assert not can_pack(DistilBertForSequenceClassification(config))  # another layout: padded batches
    decoder = tiny_bert_config(vocab_size=100, num_hidden_layers=1, is_decoder=True)
    assert not can_pack(BertForSequenceClassification(decoder))  # causal attention: padded batches


def test_classifier_falls_back_to_padded_batches_when_attention_cannot_be_switched(tiny_dir, monkeypatch):
    # transformers only warns when it cannot switch a model's attention (it reads the model's source
    # to decide), and leaves the attention as it was: packing without packed attention would let texts
    # attend to each other. Its public set_attn_implementation made to do just that, nothing.
    monkeypatch.setattr(BertForSequenceClassification, "set_attn_implementation", lambda self, *args, **kwargs: None)
    texts = ["great film " * n for n in (9, 1, 30, 4)]
    with Classifier(str(tiny_dir), Limits(), "cpu") as classifier:
        assert classifier.packed is False
        assert_close(probs(classifier.predict(texts)), single_row_probs(tiny_dir, texts))


class GatedModel:
    """A fake predict_fn: records each batch and holds it until `gate` is set; batch number `fail_on` raises."""

    def __init__(self, fail_on=None):
        self.batches, self.entered, self.gate = [], threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, texts):
        self.batches.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        if len(self.batches) == self.fail_on:
            raise RuntimeError("out of memory")
        return torch.zeros(len(texts), 2)


def test_worker_failure_reaches_every_caller_and_worker_survives():
    model = GatedModel(fail_on=2)
    worker = BatchWorker(model, Limits(max_wait_ms=50))
    first = worker.submit(["a"])
    model.entered.wait(10)  # the worker is busy with ["a"]: the next two callers queue up behind it
    failed = [worker.submit(["b"]), worker.submit(["c", "d"])]
    model.gate.set()
    assert first.result(timeout=10) == [[0.0, 0.0]]
    for future in failed:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(timeout=10)
    assert model.batches[1] == ["b", "c", "d"]
    assert worker.submit(["e"]).result(timeout=10) == [[0.0, 0.0]]
    assert worker.waiting == 0
    worker.close()


def test_worker_waits_for_as_many_texts_as_were_in_flight():
    """A lone caller is never kept waiting for company; callers that resend at once are merged."""
    model = GatedModel()
    worker = BatchWorker(model, Limits(max_wait_ms=60_000))  # a wait that is not cut short would time out
    model.gate.set()
    assert worker.submit(["a"]).result(timeout=10) == [[0.0, 0.0]]  # nothing was in flight before: no wait
    assert worker.submit(["b"]).result(timeout=10) == [[0.0, 0.0]]  # one was in flight: no wait either
    model.gate.clear()
    model.entered.clear()
    busy = worker.submit(["c"])
    model.entered.wait(10)
    queued = worker.submit(["d", "e"])  # arrives while ["c"] runs: 3 texts in flight when it ends
    model.gate.set()
    busy.result(timeout=10)
    resent = worker.submit(["f"])  # c's caller sends again: the worker has waited for it
    assert queued.result(timeout=10) == [[0.0, 0.0]] * 2
    assert resent.result(timeout=10) == [[0.0, 0.0]]
    assert [len(batch) for batch in model.batches] == [1, 1, 1, 3]
    worker.close()


def test_worker_queue_bound_and_close():
    gate = threading.Event()
    worker = BatchWorker(lambda texts: (gate.wait(10), torch.zeros(len(texts), 2))[1], Limits(max_queue=4))
    held = worker.submit(["a", "b", "c"])
    with pytest.raises(Overloaded, match="3 texts are already waiting"):
        worker.submit(["d", "e"])
    gate.set()
    assert held.result(timeout=10) == [[0.0, 0.0]] * 3
    queued = worker.submit(["f"])
    worker.close()  # finishes what was queued first
    assert queued.result(timeout=1) == [[0.0, 0.0]]
    with pytest.raises(Overloaded, match="shutting down"):
        worker.submit(["g"])


def test_check_texts_names_the_bad_text():
    limits = Limits(max_inputs=3, max_chars=10)
    check_texts(["ok", "x" * 10, "\x00"], limits)
    with pytest.raises(InputError, match=r"texts\[1\] has 11 characters") as err:
        check_texts(["ok", "x" * 11], limits)
    assert err.value.status == 413
    with pytest.raises(InputError, match="line 2 is empty") as err:
        check_texts(["ok", "  "], limits, name=lambda i: f"line {i + 1}")
    assert err.value.status == 422


# -----------------------------------------------------------------------------
# command lines: python -m serve flags and environment, python -m serve.predict


def test_app_defaults_bind_loopback():
    cfg = parse_config([])
    assert (cfg.host, cfg.port, cfg.model_dir) == ("127.0.0.1", 8000, "./fine-tuned-bert")


@pytest.mark.parametrize("argv,message", [
    (["--model_dir", "/no/such/model"], "model folder '/no/such/model' does not exist"),
    (["--max_queue", "8"], "--max_queue (8) must be at least --max_inputs (32)"),
    (["--max_inputs", "0"], "--max_inputs must be a positive integer"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_app_bad_flags_exit_2_with_one_line(argv, message, capsys):
    err = usage_error(app_module.main, argv, capsys)
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_app_config_from_environment(tiny_dir):
    env = {"SERVE_MODEL_DIR": str(tiny_dir), "SERVE_MAX_INPUTS": "8", "SERVE_MAX_WAIT_MS": "2.5", "OTHER": "x"}
    cfg = app_module.config_from_env(env)
    assert (cfg.model_dir, cfg.max_inputs, cfg.max_wait_ms, cfg.host) == (str(tiny_dir), 8, 2.5, "127.0.0.1")


def test_predict_cli_matches_the_api(client, tiny_dir, tmp_path, capsys):
    texts = ["great film", "awful boring movie", "שלום 😍"]
    predict_module.main(["--model_dir", str(tiny_dir), *texts])
    from_args = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("\n".join(texts * 30) + "\n", encoding="utf-8")  # 90 lines: three chunks
    predict_module.main(["--model_dir", str(tiny_dir), "--file", str(reviews)])
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    api = predict(client, texts=texts)
    assert [p["label"] for p in from_args] == [p["label"] for p in api]
    assert_close(probs(from_args), probs(api))
    assert len(from_file) == 90
    assert_close(probs(from_file), probs(api * 30))


@pytest.mark.parametrize("argv,message", [
    ([], "give reviews as arguments or --file"),
    (["--file", "/no/such/file.txt"], "cannot read it as UTF-8 text"),
    (["--model_dir", "/no/such/model", "fine"], "model folder '/no/such/model' does not exist"),
    (["ok", "  "], "argument 2 is empty or whitespace only"),
])
def test_predict_cli_bad_input_exits_2(argv, message, capsys):
    err = usage_error(predict_module.main, argv, capsys)
    assert err.startswith("error: ") and message in err


def test_predict_cli_names_the_blank_line(tmp_path, capsys):
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("good\n\nbad\n")
    assert f"line 2 of {reviews} is empty" in usage_error(predict_module.main, ["--file", str(reviews)], capsys)


def test_documented_commands_serve_and_predict_alike(tiny_dir, tmp_path):
    """`uvicorn serve.app:app_from_env --factory` with SERVE_MODEL_DIR, and `python -m serve.predict`,
    exactly as the docs write them, in processes of their own: the same answer for the same text."""
    port = free_port()
    factory = ["-m", "uvicorn", "serve.app:app_from_env", "--factory", "--port", str(port)]
    with server_process(factory, port, tmp_path / "server.log", env={"SERVE_MODEL_DIR": str(tiny_dir)}) as url:
        served = httpx.post(f"{url}/predict", json={"text": "great film"}).json()
    printed = subprocess.run([sys.executable, "-m", "serve.predict", "--model_dir", str(tiny_dir), "great film"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    line = json.loads(printed.stdout)
    assert line["label"] == served["predictions"][0]["label"]
    assert line["scores"] == pytest.approx(served["predictions"][0]["scores"], abs=1e-6)


def test_a_batch_is_tokenized_in_the_worker_once_per_truncation_side(tiny_dir):
    """The worker tokenizes a gathered batch in one call per side (its texts cut from the right, those
    cut from the left), so that requests reach the queue without waiting on each other's tokenizing;
    the padded path then only pads those ids. Texts that came tokenized are not tokenized again."""
    calls = []
    gate, entered = threading.Event(), threading.Event()
    with Classifier(str(tiny_dir), Limits(packed=False, forward_cost_tokens=0), "cpu") as classifier:
        classifier.tokenizers.update({side: Recording(core, side, calls) for side, core in classifier.tokenizers.items()})
        run = classifier.worker.predict_fn
        classifier.worker.predict_fn = lambda texts: (entered.set(), gate.wait(10), run(texts))[2]
        held = classifier.submit(["dull"])  # holds the worker while three more requests queue up
        entered.wait(10)
        texts = ["great film " * n for n in (9, 1, 50, 4)]  # 50 repeats: over 64 tokens, cut
        right = classifier.submit(texts[:2])
        left = classifier.worker.submit([Text(text, "left") for text in texts[2:]])
        tokenized = classifier.worker.submit([Text("awful", ids=[2, 5, 3])])  # [CLS] ? [SEP], as TEI's truncate: false
        while classifier.worker.queued() < 5:
            time.sleep(0.01)
        gate.set()
        held.result(timeout=10)
        got = right.result(timeout=10) + left.result(timeout=10)
        tokenized.result(timeout=10)
    assert calls == [("right", ["dull"], "batch-worker"),  # the batch that held the worker, then the three as one
                     ("right", texts[:2], "batch-worker"), ("left", texts[2:], "batch-worker")]
    model, tokenizer = load_for_inference(str(tiny_dir))
    tokenizer.truncation_side = "left"
    want = classify(model, tokenizer, texts[:2], 64).tolist() + classify(model, tokenizer, texts[2:], 64).tolist()
    assert_close(torch.tensor(got).softmax(-1), want)


class Recording:
    """A tokenizer that records (its side, the texts, the thread) of each encode_batch call."""

    def __init__(self, core, side, calls):
        self.core, self.side, self.calls = core, side, calls

    def encode_batch(self, texts):
        self.calls.append((self.side, list(texts), threading.current_thread().name))
        return self.core.encode_batch(texts)


def test_dtype_flag_loads_the_weights_in_that_format(tiny_dir, capsys):
    texts = ["great film " * n for n in (9, 1, 30, 4)]
    with Classifier(str(tiny_dir), Limits(dtype="bfloat16"), "cpu") as classifier:
        assert classifier.dtype == "bfloat16"
        assert next(classifier.model.parameters()).dtype == torch.bfloat16
        bf16 = probs(classifier.predict(texts))
    assert_close(bf16, single_row_probs(tiny_dir, texts), atol=0.02)  # bf16 keeps ~3 significant digits
    err = usage_error(app_module.main, ["--model_dir", str(tiny_dir), "--dtype", "int8"], capsys)
    assert "--dtype: invalid choice: 'int8'" in err
