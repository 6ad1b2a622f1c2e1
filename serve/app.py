"""Sentiment web app: a page for people (GET /) and a JSON API for programs (POST /predict).

Serves any folder written by `save_pretrained` (train_loop.py writes ./fine-tuned-bert). POST /predict
also speaks Text Embeddings Inference's API ({"inputs": ...}), POST / the Hub's (what
huggingface_hub.InferenceClient(base_url=...).text_classification sends): serve/ecosystem.py.
GET /metrics reports Prometheus metrics named as TEI's; each answer carries x-request-id and each
request has a log line with it (serve/metrics.py). POST /explain says which words made the prediction
(Integrated Gradients, explain.py), on a model copy and a thread of its own (serve/explaining.py).

    python -m serve                                          # ./fine-tuned-bert on http://127.0.0.1:8000
    python -m serve --model_dir path/to/model --host 0.0.0.0 --port 8080
    python -m serve --help                                   # every flag, limits included
    SERVE_MODEL_DIR=path/to/model uvicorn serve.app:app_from_env --factory
                                                             # the same app under uvicorn's own CLI;
                                                             # every flag is also SERVE_<FLAG> in the environment
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"text": "A wonderful film."}'
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"inputs": "A wonderful film."}'
    curl -s localhost:8000/explain -H 'content-type: application/json' -d '{"text": "A wonderful film."}'

The model loads in the background once the server is up: GET /health answers 503 until it is
loaded and warmed up, then 200. All model calls go through one batching worker (serve/batching.py).
If the model cannot be loaded, the server stops with exit code 1 (as Text Embeddings Inference
does), so an orchestrator sees the failure. On SIGTERM it answers the requests it has, refuses new
connections, stops the worker, and exits 0 (docs/serving.md).
"""

import os

# Before torch loads OpenMP. By default its threads spin for milliseconds after each operation,
# taking the CPU from the event loop that is reading the next requests; the batches then ran
# several times slower (BENCHMARKS.md). PASSIVE makes them sleep instead. GNU libgomp (torch's
# Linux wheels) still spins GOMP_SPINCOUNT times first, a fraction of a millisecond: enough to catch
# the next operation of the same forward pass without a sleep and a wake-up (more throughput at
# concurrency 1, BENCHMARKS.md), too little to starve the event loop between batches. Any value the
# user set wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "30000"

import asyncio  # noqa: E402 (the setting above must come first)
import json
import logging
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import HfArgumentParser

from errors import UsageError, exit_on_usage_error
from explain import N_STEPS
from model_utils import check_model_dir
from serve.batching import InputError, Limits, Overloaded, check_texts
from serve.classifier import Classifier, Text, softmax, to_prediction
from serve.ecosystem import (ErrorType, HubPrediction, Task, TeiPrediction, check_inputs, error_type_for, hub_answer,
                             hub_request, hub_task, tei_answer, tei_request, tei_task, timing_headers)
from serve.explaining import Busy, ShuttingDown, load_explaining, to_answer
from serve.memory import describe as describe_memory
from serve.metrics import Metrics, RequestLog

log = logging.getLogger("app")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
ENV_PREFIX = "SERVE_"
EXIT_LOAD_FAILED = 1  # errors.RunFailed's code: the run cannot go on


# -----------------------------------------------------------------------------
# config


@dataclass
class ServeConfig(Limits):
    model_dir: str = field(default="./fine-tuned-bert", metadata={"help": "a save_pretrained folder (safetensors)"})
    host: str = field(default="127.0.0.1", metadata={"help": "loopback only; 0.0.0.0 serves other machines too"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    eval_results: str = field(
        default=None,
        metadata={"help": "JSON shown on /info; default: eval_results.json in model_dir, else in ../results beside it"},
    )
    device: str = field(default=None, metadata={"help": "cpu, cuda, ...; default: cuda when available"})
    max_body_bytes: int = field(default=2 * 1024 * 1024, metadata={"help": "request body limit (TEI's 2 MB)"})
    graceful_shutdown_s: float = field(
        default=20.0,
        metadata={"help": "on SIGTERM, the longest to wait for open requests before cancelling them; under "
                          "Kubernetes' default 30 s grace period (uvicorn's CLI: --timeout-graceful-shutdown)"},
    )
    access_log: bool = field(
        default=True,
        metadata={"help": "one log line per request, with its x-request-id (in place of uvicorn's access log)"},
    )
    max_concurrent_explains: int = field(
        default=1,
        metadata={"help": "POST /explain: explanations admitted at once (they run one after another, on a float32 "
                          "copy of the model); one more gets 429. 0: /explain is off and no copy is loaded"},
    )
    explain_n_steps: int = field(
        default=N_STEPS,
        metadata={"help": "POST /explain: Integrated Gradients' points along the path; the cost grows with it"},
    )


def parse_config(argv):
    parser = HfArgumentParser(ServeConfig, prog="python -m serve")
    try:
        (cfg,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:
        raise UsageError(f"{err}. Run `python -m serve --help` for every flag.") from None
    return validate_config(cfg)


def validate_config(cfg):
    for name in ("max_inputs", "max_chars", "max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, not {getattr(cfg, name)}.")
    if cfg.forward_cost_tokens is not None and cfg.forward_cost_tokens < 0:
        raise UsageError(f"--forward_cost_tokens must be 0 or more, not {cfg.forward_cost_tokens}.")
    if cfg.max_wait_ms < 0:
        raise UsageError(f"--max_wait_ms must be 0 or more, not {cfg.max_wait_ms}.")
    if cfg.graceful_shutdown_s <= 0:
        raise UsageError(f"--graceful_shutdown_s must be more than 0, not {cfg.graceful_shutdown_s}.")
    if cfg.max_concurrent_explains < 0:
        raise UsageError(f"--max_concurrent_explains must be 0 (off) or more, not {cfg.max_concurrent_explains}.")
    if cfg.explain_n_steps < 1:
        raise UsageError(f"--explain_n_steps must be a positive integer, not {cfg.explain_n_steps}.")
    if cfg.max_queue < cfg.max_inputs:
        raise UsageError(f"--max_queue ({cfg.max_queue}) must be at least --max_inputs ({cfg.max_inputs}).")
    if not 0 <= cfg.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {cfg.port}.")
    cfg.device = cfg.device or default_device()
    return cfg


def default_device():
    """An NVIDIA GPU, else an Apple GPU (MPS), else the CPU: the first one this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def config_from_env(environ=os.environ):
    """The same flags read from SERVE_<FLAG> variables, for `uvicorn serve.app:app_from_env --factory`."""
    argv = []
    for f in fields(ServeConfig):
        if ENV_PREFIX + f.name.upper() in environ:
            argv += [f"--{f.name}", environ[ENV_PREFIX + f.name.upper()]]
    return parse_config(argv)


def find_eval_results(cfg):
    """The training run's evaluation results, or None. train_loop.py writes ./results/eval_results.json."""
    candidates = [cfg.eval_results] if cfg.eval_results else [
        os.path.join(cfg.model_dir, "eval_results.json"),
        os.path.join(cfg.model_dir, os.pardir, "results", "eval_results.json"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return os.path.abspath(path), json.load(f)
            except (OSError, ValueError) as err:
                log.warning("cannot read %s: %s", path, err)
    return None, None


# -----------------------------------------------------------------------------
# model state: loaded in the background so /health can say 503 while it loads


class ModelState:
    def __init__(self, cfg, exit_on_failure=False, on_ready=None):
        self.cfg = cfg
        self.exit_on_failure = exit_on_failure  # a server process stops; an app inside a test keeps serving 503
        self.on_ready = on_ready  # called with the classifier before it serves (the metrics hook in)
        self.classifier = None  # set once loaded and warmed up
        self.explaining = None  # the explainer (serve/explaining.py), set before `classifier`; None when off
        self.error = None  # set if loading failed

    def load(self, load_classifier, load_explainer):
        """Runs in a background thread; assigning `classifier` is what makes /health say 200, so the
        explainer loads (and warms up) first: a server that says ready answers /explain too."""
        try:
            started = time.perf_counter()
            if self.cfg.max_concurrent_explains > 0:
                self.explaining = load_explainer(self.cfg.model_dir, self.cfg, self.cfg.device)
            classifier = load_classifier(self.cfg.model_dir, self.cfg, self.cfg.device)
            if self.on_ready is not None:
                self.on_ready(classifier)
            self.classifier = classifier
            copy = " (and its float32 copy for /explain)" if self.explaining is not None else ""
            log.info("model %s%s loaded and warmed up in %.1f s: ready", self.cfg.model_dir, copy,
                     time.perf_counter() - started)
        except Exception as err:  # a broken folder (truncated weights, say): one paragraph, no traceback
            self.error = str(err).rstrip(".") or type(err).__name__
            log.error("%s", self.failure_message())
            if self.exit_on_failure:
                stop_server()

    def failure_message(self):
        stops = f"; the server stops with exit code {EXIT_LOAD_FAILED}" if self.exit_on_failure else ""
        return (f"error: cannot load the model from {self.cfg.model_dir!r}: {self.error}. Check that the folder "
                f"holds the complete files save_pretrained wrote (a copy cut short leaves truncated weights){stops}.")

    def not_ready(self, loading="the model is still loading; retry in a few seconds."):
        """Why there is no answer yet: the 503 message."""
        return loading if self.error is None else f"the model failed to load: {self.error}"


# -----------------------------------------------------------------------------
# request and response shapes


def predict_request(limits):
    """The /predict body as a type: {"text": ...}, {"texts": [...]} or TEI's {"inputs": ...}, exactly
    one of the three (`oneOf` in /openapi.json, so that the schema says exactly what the app accepts).

    The limits appear in the schema (maxLength, maxItems, a non-blank pattern), but check_texts
    enforces them, as for the command line: sizes answer 413, as in TEI, where pydantic would say 422.
    (TEI's own body follows TEI's checks: serve/ecosystem.py.)
    """
    review = Annotated[StrictStr, Field(json_schema_extra={"maxLength": limits.max_chars, "pattern": r"\S"})]

    class OneText(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "A wonderful, moving film."}]})
        text: review = Field(description="one review")

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["Great!", "Dull."]}]})
        texts: list[review] = Field(description=f"several reviews (at most {limits.max_inputs}), answered in order",
                                    json_schema_extra={"minItems": 1, "maxItems": limits.max_inputs})

    one_of = (Annotated[OneText, Tag("text")] | Annotated[ManyTexts, Tag("texts")]
              | Annotated[tei_request(limits), Tag("inputs")])
    return Annotated[one_of, Discriminator(input_field, custom_error_type="one_of",
                                           custom_error_message='send exactly one of "text", "texts" or "inputs"')]


SHAPES = ("text", "texts", "inputs")


def input_field(body):
    """Which shape a body has: "text", "texts" or "inputs" when it holds exactly one of them (null
    counts as absent), else None, and pydantic reports a "one_of" error."""
    if not isinstance(body, dict):
        return None
    present = [name for name in SHAPES if body.get(name) is not None]
    return present[0] if len(present) == 1 else None


def our_task(body):
    if hasattr(body, "inputs"):
        return tei_task(body)
    if hasattr(body, "texts"):
        return Task("ours", body.texts, single=False)
    return Task("ours", [body.text], single=True, name=lambda i: "text")


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="probability of every class, in the model's label order")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per input text, in input order")


# What /predict answers: ours for {"text"} and {"texts"}; TEI's for {"inputs"}, a flat list for one input.
PREDICT_ANSWERS = PredictResponse | list[TeiPrediction] | list[list[TeiPrediction]]


def explain_request(limits):
    """The /explain body: one review, as {"text": ...} of /predict, and the end to cut when it is too long."""

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "A wonderful, moving film."}]})
        text: StrictStr = Field(description="one review", json_schema_extra={"maxLength": limits.max_chars,
                                                                             "pattern": r"\S"})
        truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
            "Right", description="over the model's maximum, Right explains a review's beginning, Left its end "
                                 "(spelt as in TEI's body of /predict)")

    return ExplainRequest


class ExplainedWord(BaseModel):
    text: str = Field(description="the word: the review's characters start to end")
    start: int = Field(description="offset of its first character in the review, in Unicode code points")
    end: int = Field(description="offset just after its last character")
    attributions: dict[str, float] = Field(
        description="per class, the word's share of the change in that class's probability from the baseline "
                    "(the review with every word replaced by [PAD]) to the review; a word's scores add up to 0")


class ExplainResponse(BaseModel):
    prediction: Prediction = Field(description="the explained model copy's prediction for the review")
    words: list[ExplainedWord] = Field(description="the words the model saw, in text order (whitespace-separated)")
    truncated: bool = Field(description="the review was over max_length tokens: only the words listed were seen")
    num_tokens: int = Field(description="tokens explained, [CLS] and [SEP] included")
    max_length: int = Field(description="the model's maximum, in tokens")
    n_steps: int = Field(description="Integrated Gradients' points along the path (--explain_n_steps)")
    deltas: dict[str, float] = Field(
        description="per class, the convergence delta: the sum of the words' scores minus "
                    "(scores - baseline_scores), the error of the integral")
    baseline_scores: dict[str, float] = Field(description="probability of every class for the all-[PAD] baseline")
    seconds: float = Field(description="how long the explanation took, in the explainer's thread")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in one paragraph")
    error_type: ErrorType = Field(description="the class of problem, in Text Embeddings Inference's words")


# Every status a route answers besides 200, documented in /openapi.json.
WHEN = {
    400: "the body is not UTF-8; in TEI's and the Hub's API, a text is empty (error_type Empty)",
    413: "the body, a text or the number of texts is over its limit (in TEI's and the Hub's API, only the body)",
    422: "the body is not one of the accepted shapes, a text is blank or not valid Unicode; in TEI's and the "
         "Hub's API also too many texts, or a text over the model's maximum with truncate false",
    429: "too many texts are waiting for the model; retry after Retry-After seconds",
    503: "the model is still loading",
}
EXPLAIN_WHEN = WHEN | {
    400: "the body is not UTF-8",
    413: "the body or the text is over its limit",
    422: "the body is not {\"text\": ...} (with an optional truncation_direction), or the text is blank or not "
         "valid Unicode",
    429: "--max_concurrent_explains explanations are running or waiting already; retry after Retry-After seconds",
    503: "the model is still loading, or the server is stopping",
}
RETRY_AFTER = {"retry-after": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}


def documented(*codes, when=WHEN):
    responses = {code: {"model": ErrorResponse, "description": when[code]} for code in codes}
    if 429 in responses:
        responses[429]["headers"] = RETRY_AFTER
    return responses


# -----------------------------------------------------------------------------
# errors: always JSON {"error": "...", "error_type": "..."}, never a stack trace


def error(status, message, headers=None, error_type=None):
    """The error body of every route: TEI's ErrorResponse, whatever style the request had."""
    return JSONResponse({"error": message, "error_type": error_type or error_type_for(status)}, status_code=status,
                        headers=headers)


# What each body shape takes, for the message about an unknown field.
FIELDS = {
    "text": "send 'text' or 'texts'",
    "texts": "send 'text' or 'texts'",
    "inputs": "TEI's API takes 'inputs', 'truncate', 'truncation_direction' and 'raw_scores'",
    "hub": "POST / takes 'inputs' and 'parameters'",
    "parameters": "'parameters' takes 'top_k' and 'function_to_apply'",
    "explain": "POST /explain takes 'text' and 'truncation_direction'",
}
EXAMPLES = {"/predict": '{"text": "..."}', "/": '{"inputs": "..."}', "/explain": '{"text": "..."}'}
BODY_OF = {"/": "hub", "/explain": "explain"}  # the FIELDS entry of a route whose body has one shape


def describe_validation_errors(errors, path="/predict"):
    """FastAPI's error list -> one readable sentence per problem, e.g. "texts[1]: Input should be a valid string".
    On /predict the second part of each location is the body's shape ("text", "texts", "inputs")."""
    parts = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())][1:]  # drop "body"
        shape = loc.pop(0) if path == "/predict" and loc else BODY_OF.get(path, "hub")
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
        elif err.get("type") == "one_of":
            parts.append(describe_wrong_shape(err.get("input")))
        elif err.get("type") == "inputs":  # serve/ecosystem.py's own sentence
            parts.append(err.get("msg"))
        elif not loc:  # no body at all, or a form
            parts.append(f"the body must be a JSON object such as {EXAMPLES.get(path, '{}')}, sent as application/json")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc[-1]!r}: {FIELDS['parameters' if loc[0] == 'parameters' else shape]}")
        else:
            where = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc).lstrip(".") or "body"
            parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) + "."


def describe_wrong_shape(body):
    """A body that is none of {"text": ...}, {"texts": [...]} and {"inputs": ...}."""
    if not isinstance(body, dict):  # a list, a string, a number
        return 'the body must be a JSON object such as {"text": "..."}, sent as application/json'
    unknown = sorted(set(body) - set(SHAPES))
    if unknown and all(body.get(name) is None for name in SHAPES):
        return f"unknown field {unknown[0]!r}: send 'text' or 'texts' (or TEI's 'inputs')"
    return ('send exactly one of "text" (a string), "texts" (a list of strings) or "inputs" (Text Embeddings '
            'Inference\'s API)')


async def validation_error(request, exc):
    return error(422, describe_validation_errors(exc.errors(), request.url.path))


async def http_error(request, exc):
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names the methods of one route; GET / and POST / are two
        headers = {name: value for name, value in (headers or {}).items() if name.lower() != "allow"}
        headers["allow"] = ", ".join(allowed_methods(request.app, request.url.path))
    return error(exc.status_code, str(exc.detail), headers)


def allowed_methods(app, path):
    """Every method some route of `app` answers at `path`, sorted: the 405's Allow header."""
    return sorted({method for route in app.routes if getattr(route, "methods", None) and route.path_regex.match(path)
                   for method in route.methods})


async def unexpected_error(request, exc):
    """A genuine bug: the caller learns nothing about the internals; Starlette re-raises the
    exception after this response, so uvicorn logs the traceback on the server."""
    return error(500, "internal server error; the details are in the server's log.")


# What a refused body may still cost us: read and thrown away, so that the client sees the 413 (below).
DRAIN_MAX_BYTES = 64 * 1024 * 1024  # 32 bodies of the default limit; beyond it, answer at once
DRAIN_MAX_SECONDS = 5.0  # nginx's lingering_timeout; a client this slow sees the connection close


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 (by Content-Length, or by counting a chunked body)."""

    def __init__(self, app, max_bytes):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= DRAIN_MAX_BYTES:
                await discard_body(receive, DRAIN_MAX_BYTES, DRAIN_MAX_SECONDS)
            return await self.too_large(scope, receive, send)
        # Read the body here (FastAPI would buffer it anyway), counting, then replay it downstream.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await discard_body(receive, DRAIN_MAX_BYTES - size, DRAIN_MAX_SECONDS)
                return await self.too_large(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # waits for http.disconnect, as Starlette expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        message = f"request body is larger than the limit of {self.max_bytes} bytes; send fewer or shorter texts."
        await error(413, message, headers={"connection": "close"})(scope, receive, send)


async def discard_body(receive, max_bytes, max_seconds):
    """Read the rest of a refused body and drop it: at most `max_bytes`, for at most `max_seconds`.

    Why: urllib and requests send the whole body before they read the answer. Closing the socket
    with their bytes unread makes the kernel send a reset, and they see "connection reset by peer"
    instead of our 413. (curl sends `Expect: 100-continue` and waits: it is answered at once, unread.)
    """
    try:
        async with asyncio.timeout(max_seconds):
            while max_bytes >= 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return  # the client went away, or the body is read to its end
                max_bytes -= len(message.get("body", b""))
    except TimeoutError:
        pass


# -----------------------------------------------------------------------------
# classification: one path for every body style (ours, TEI's, the Hub's)


async def classify(task, state, cfg, metrics):
    """Check, classify (the batching worker tokenizes too), answer in the task's style with TEI's
    timing headers. Counts the request in te_request_count and exactly one of
    te_request_success or te_request_failure{err}, TEI's labels for why."""
    started = time.perf_counter()
    method = "single" if task.single else "batch"
    metrics.request_count.labels(method).inc()
    classifier = state.classifier
    if classifier is None:
        return refused(metrics, "unhealthy", error(503, state.not_ready()))
    try:
        check_task(task, cfg)
    except InputError as err:
        return refused(metrics, "batch_size" if len(task.texts) > cfg.max_inputs else "validation", err)
    texts = [Text(text, task.side) for text in task.texts]
    if not task.truncate:  # the one case where the lengths must be known before the queue
        try:
            for text, ids in zip(texts, await untruncated_ids(task, classifier)):
                text.ids = ids
        except InputError as err:
            return refused(metrics, "tokenization", err)
    checked = time.perf_counter()
    try:
        job = classifier.worker.submit_job(texts)
    except Overloaded as err:
        busy = "Model is overloaded" if task.style != "ours" else "server busy"
        return refused(metrics, "overloaded", error(429, f"{busy}: {err}", headers={"retry-after": "1"}))
    try:
        rows = await asyncio.wrap_future(job.future)
    except Exception:
        metrics.request_failure.labels("inference").inc()
        raise  # a bug or a failed model: unexpected_error answers 500, the log has the traceback
    answer = answer_for(task, rows, classifier)
    ids = [text.ids for text in texts]
    seconds = request_seconds(started, checked, job, texts)
    metrics.answered(method, ids, seconds)
    headers = timing_headers(classifier.device_type, sum(map(len, task.texts)), sum(map(len, ids)), *seconds)
    return JSONResponse(answer, headers=headers)


def request_seconds(started, checked, job, texts):
    """(total, tokenization, queue, inference) for TEI's headers and histograms: the checks (and any
    tokenizing before the queue), then the means over the texts of the queue wait, the batch's
    tokenizing and the rest of the batch's run."""
    batch_tokenization = sum(text.tokenization_seconds for text in texts) / len(texts)
    return (time.perf_counter() - started, checked - started + batch_tokenization, job.queue_seconds / len(texts),
            job.inference_seconds / len(texts) - batch_tokenization)


# Up to this many characters, texts that must not be truncated are tokenized on the event loop: a
# review of 500 characters takes ~0.15 ms, less than handing it to a thread and back. Longer ones
# go to the tokenizer thread, so that tens of milliseconds of tokenizing stall no other request.
INLINE_TOKENIZE_CHARS = 20_000


async def untruncated_ids(task, classifier):
    if sum(map(len, task.texts)) <= INLINE_TOKENIZE_CHARS:
        return classifier.encode(task.texts, task.name)
    return await asyncio.wrap_future(classifier.encode_async(task.texts, task.name))


def check_task(task, cfg):
    """Our body, our checks (413 for sizes); TEI's and the Hub's, TEI's checks (serve/ecosystem.py)."""
    if task.style == "ours":
        check_texts(task.texts, cfg, task.name)
    else:
        check_inputs(task, cfg)


def refused(metrics, err, answer):
    """Count a refusal under TEI's te_request_failure label `err`; `answer` is a response or an InputError."""
    metrics.request_failure.labels(err).inc()
    if isinstance(answer, InputError):
        return error(answer.status, str(answer), error_type=answer.error_type)
    return answer


def answer_for(task, rows, classifier):
    """The answer body in the task's style, from each text's logits."""
    if task.style == "tei":
        return tei_answer(rows, classifier.labels, task)
    if task.style == "hub":
        return hub_answer(rows, classifier.labels, task, classifier.config)
    return {"predictions": [to_prediction(softmax(logits), classifier.labels) for logits in rows]}


# -----------------------------------------------------------------------------
# the app


def create_app(cfg, load_classifier=Classifier, exit_on_load_failure=False, load_explainer=load_explaining):
    """The ASGI app for `cfg`. `load_classifier(model_dir, limits, device)` and `load_explainer(model_dir,
    cfg, device)` (serve/explaining.py) are injectable for tests.

    exit_on_load_failure: a model that cannot load stops the server process (exit code 1), for
    `python -m serve` and the uvicorn factory; otherwise (a test, an app embedding this one, whose
    process is not ours to end) it keeps answering 503 with the reason."""
    metrics = Metrics()
    state = ModelState(cfg, exit_on_failure=exit_on_load_failure, on_ready=partial(hook_metrics, metrics))
    metrics.watch_queue(lambda: state.classifier.worker.queued() if state.classifier else 0)
    app = FastAPIOffline(  # FastAPI whose /docs needs no CDN: users may be offline
        title="Sentiment analysis",
        description="Classifies movie reviews with a fine-tuned BERT. The page for people is at /. "
                    "POST /predict also takes Text Embeddings Inference's body, POST / the Hub's.",
        lifespan=partial(load_in_background, state=state, loaders=(load_classifier, load_explainer)),
    )
    app.state.model = state
    app.state.metrics = metrics
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    add_page(app)
    add_hub(app, cfg, state, metrics)
    add_predict(app, cfg, state, metrics)
    add_explain(app, cfg, state)
    add_health(app, state)
    add_info(app, cfg, state)
    add_metrics(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    # Added last, so outermost: a 413 from BodyLimit is counted, logged and carries x-request-id too.
    app.add_middleware(RequestLog, metrics=metrics, routes=frozenset(route.path for route in app.routes),
                       access_log=cfg.access_log)
    return app


def hook_metrics(metrics, classifier):
    """Before the loaded classifier serves: its batches feed te_batch_next_size and te_batch_next_tokens
    (the warm-up batches, before this, are not requests and are not counted)."""
    classifier.worker.on_batch = metrics.batch_done


@asynccontextmanager
async def load_in_background(app, state, loaders):
    """The server answers at once (503 on /health) while the model loads in a thread. The end runs
    once uvicorn has answered every open request (or cancelled those still open after
    --graceful_shutdown_s): the worker finishes what is queued and stops; an explanation still
    running is stopped at its next chunk, since nobody is left to read its answer."""
    threading.Thread(target=state.load, args=loaders, name="model-loader", daemon=True).start()
    yield
    if state.classifier is not None:
        await asyncio.to_thread(state.classifier.close)
        worker = state.classifier.worker
        log.info("batching worker stopped (batches run: %d, texts classified: %d)", worker.batches, worker.texts_done)
    if state.explaining is not None:
        await asyncio.to_thread(state.explaining.close)
    if state.error is not None and state.exit_on_failure:
        exit_now(EXIT_LOAD_FAILED)


def stop_server():
    """Shut uvicorn down as an orchestrator does, with SIGTERM: the app has no handle on the server
    under uvicorn's own CLI. uvicorn closes its port, answers what is open, then ends the lifespan."""
    os.kill(os.getpid(), signal.SIGTERM)


def exit_now(code):
    """End the process with `code`. uvicorn swallows any exception raised in the lifespan, and after a
    SIGTERM it ends the process by that signal (status 143), so os._exit is the one way to report a
    failure. Nothing is lost: the connections are closed by now, and log lines were flushed as written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_page(app):
    @app.get("/", response_class=HTMLResponse)
    async def page():
        """The page for people: paste a review, see its label."""
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")


def add_hub(app, cfg, state, metrics):
    request = hub_request(cfg)

    @app.post("/", response_model=list[list[HubPrediction]], responses=documented(400, 413, 422, 429, 503),
              description="The Hub's text-classification API, as `huggingface_hub.InferenceClient(base_url=...)."
                          "text_classification` sends it: one list per input, the best labels first.")
    async def hub(body: request):
        return await classify(hub_task(body), state, cfg, metrics)


def add_predict(app, cfg, state, metrics):
    request = predict_request(cfg)

    @app.post("/predict", response_model=PREDICT_ANSWERS, responses=documented(400, 413, 422, 429, 503),
              description=f"Classify `text` or up to {cfg.max_inputs} `texts`; longer reviews are truncated "
                          "to the model's maximum. Or send Text Embeddings Inference's body (`inputs`, "
                          "`truncate`, `truncation_direction`, `raw_scores`) for TEI's answer.")
    async def predict(body: request):
        return await classify(our_task(body), state, cfg, metrics)


# Why 404 when /explain is off: the server does not serve that route, exactly as for an address it
# never had, and /openapi.json leaves it out. A 503 would say "try again later": a client or a load
# balancer would retry, or mark the replica unhealthy, yet nothing changes until a restart with the
# flag. A 501 is a server error (it would alert whoever watches 5xx) for what is a configuration choice.
EXPLAIN_OFF = ("POST /explain is off on this server: it was started with --max_concurrent_explains 0, so it loaded no "
               "model copy for explanations. Restart it with --max_concurrent_explains 1 (the default) to enable it.")

STOPPED_BY_SHUTDOWN = ("the server is shutting down, and this explanation did not finish within --graceful_shutdown_s; "
                       "retry (another replica may answer).")


def add_explain(app, cfg, state):
    if cfg.max_concurrent_explains == 0:
        @app.post("/explain", include_in_schema=False)
        async def explain_off():
            return error(404, EXPLAIN_OFF)
        return

    request = explain_request(cfg)

    @app.post("/explain", response_model=ExplainResponse,
              responses=documented(400, 413, 422, 429, 503, when=EXPLAIN_WHEN),
              description="Why the model said what it said: each word's share of each class's probability "
                          f"(Integrated Gradients, {cfg.explain_n_steps} steps), computed on a float32 copy of the "
                          f"model in a thread of its own. At most {cfg.max_concurrent_explains} at once: one "
                          "more is refused with 429 and Retry-After.")
    async def explain(body: request):
        if state.classifier is None:  # the explainer is set first: the classifier says it is all ready
            return error(503, state.not_ready())
        try:
            check_texts([body.text], cfg, name=lambda i: "text")  # what /predict refuses in {"text"}, refused alike
        except InputError as err:
            return error(err.status, str(err), error_type=err.error_type)
        try:
            future = state.explaining.submit(body.text, body.truncation_direction.lower())
        except Busy as err:
            return error(429, f"server busy: {err}", headers={"retry-after": str(err.retry_after)})
        try:
            explanation, seconds = await asyncio.wrap_future(future)
        except (asyncio.CancelledError, ShuttingDown):
            # uvicorn cancels what is still open --graceful_shutdown_s after a SIGTERM, and would answer
            # a bare 500. It is no bug: say so, in our error body; the explanation stops at its next chunk.
            return error(503, STOPPED_BY_SHUTDOWN)
        return to_answer(explanation, seconds)


def add_health(app, state):
    @app.get("/health", response_model=HealthResponse, responses=documented(503))
    async def health():
        """200 once the model is loaded and warmed up; 503 while loading or if loading failed."""
        if state.classifier is not None:
            return {"status": "ok"}
        return error(503, state.not_ready(loading="the model is loading."))


def add_info(app, cfg, state):
    eval_path, eval_results = find_eval_results(cfg)

    @app.get("/info")
    async def info():
        """What is served: model folder, labels, limits, and the training run's evaluation results."""
        classifier = state.classifier
        return {
            "model_dir": os.path.abspath(cfg.model_dir),
            "ready": classifier is not None,
            "labels": classifier.labels if classifier else None,
            "max_length": classifier.max_length if classifier else None,
            "num_parameters": classifier.num_parameters if classifier else None,
            "device": cfg.device,
            "device_name": classifier.device_name if classifier else None,
            "dtype": classifier.dtype if classifier else None,  # the weights' number format, as loaded
            "packed": classifier.packed if classifier else None,  # batches run without padding (serve/packed.py)
            "limits": {f.name: getattr(cfg, f.name) for f in fields(Limits)} | {"max_body_bytes": cfg.max_body_bytes},
            "batches_run": classifier.worker.batches if classifier else 0,
            "texts_classified": classifier.worker.texts_done if classifier else 0,
            "explain": explain_info(cfg, state.explaining),
            "memory": describe_memory(cfg.malloc_mmap_threshold),  # the allocator, its setting, RSS now and at peak
            "eval_results_path": eval_path,
            "eval_results": eval_results,
        }


def explain_info(cfg, explaining):
    """POST /explain's settings and counts: on or off, the cap, the steps, what runs now."""
    return {
        "enabled": cfg.max_concurrent_explains > 0,
        "max_concurrent_explains": cfg.max_concurrent_explains,
        "n_steps": cfg.explain_n_steps,
        "dtype": "float32" if cfg.max_concurrent_explains > 0 else None,  # always: the copy's, not the server's
        "admitted": explaining.admitted if explaining else 0,  # running or waiting for the explainer's thread
        "explanations": explaining.explanations if explaining else 0,  # answered (the warm-up not counted)
    }


def add_metrics(app, metrics):
    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        """Prometheus metrics, named as Text Embeddings Inference's where it has the same one (docs/serving.md)."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_usage_error():
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        check_model_dir(cfg.model_dir)  # a wrong path fails here, before the port is bound
    log.info("serving %s on http://%s:%d (model loading; /health says when ready)", cfg.model_dir, cfg.host, cfg.port)
    signal.signal(signal.SIGTERM, exit_cleanly)
    # access_log=False: the app logs each request itself, with its request id (serve/metrics.py).
    uvicorn.run(create_app(cfg, exit_on_load_failure=True), host=cfg.host, port=cfg.port, log_level="info",
                access_log=False, timeout_graceful_shutdown=cfg.graceful_shutdown_s)


def exit_cleanly(signum, frame):
    """SIGTERM outside uvicorn's shutdown. uvicorn catches the signal, shuts down gracefully, then
    raises it again for the handler it found; Python's default would end the process by the signal
    (status 143). A shutdown that was asked for and completed is a success: exit code 0."""
    raise SystemExit(0)


def app_from_env():
    """The app factory for `uvicorn serve.app:app_from_env --factory`: flags from SERVE_<FLAG> variables.
    Nothing loads until the server starts."""
    # uvicorn configures its own loggers only: without this, the app's lines (model loaded, one per
    # request) would not show. (A root handler set up before, by whoever embeds us, is kept.)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_usage_error():
        return create_app(config_from_env(), exit_on_load_failure=True)


if __name__ == "__main__":
    main()
