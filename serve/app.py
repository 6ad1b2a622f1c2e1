"""Sentiment web app: a page for people (GET /) and a JSON API for programs (POST /predict).

Serves any folder written by `save_pretrained` (train_loop.py writes ./fine-tuned-bert). POST /predict
also speaks Text Embeddings Inference's API ({"inputs": ...}), POST / the Hub's (what
huggingface_hub.InferenceClient(base_url=...).text_classification sends): serve/ecosystem.py.
GET /metrics reports Prometheus metrics named as TEI's; each answer carries x-request-id and each
request has a log line with it (serve/metrics.py). POST /explain says which words made the prediction
(Integrated Gradients, training/explain.py), on a model copy and a thread of its own (serve/explaining.py).

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
# concurrency 1, BENCHMARKS.md), too little to starve the event loop between batches. Yours wins.
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

import torch
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import HfArgumentParser

from model_utils import check_model_dir
from serve.batching import InputError, Limits, Overloaded, check_texts
from serve.body_limit import BodyLimit
from serve.classifier import Classifier, Text, softmax, to_prediction
from serve.ecosystem import HubPrediction, check_inputs, hub_answer, hub_request, hub_task, tei_answer, timing_headers
from serve.explaining import Busy, ShuttingDown, load_explaining, to_answer
from serve.http_types import (EXPLAIN_WHEN, PREDICT_ANSWERS, ExplainResponse, HealthResponse, documented, error,
                              explain_request, http_error, our_task, predict_request, unexpected_error, validation_error)
from serve import memory
from serve.metrics import Metrics, RequestLog
from serve.model_state import EXIT_LOAD_FAILED, ModelState
from training import hardware
from training.errors import UsageError, exit_on_usage_error
from training.explain import N_STEPS

log = logging.getLogger("app")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
ENV_PREFIX = "SERVE_"


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
            "cpu_bf16": hardware.cpu_bf16_instructions(),  # bf16 multiply instructions (AMX-BF16, ...) or None
            "packed": classifier.packed if classifier else None,  # batches run without padding (serve/packed.py)
            "limits": {f.name: getattr(cfg, f.name) for f in fields(Limits)} | {"max_body_bytes": cfg.max_body_bytes},
            "batches_run": classifier.worker.batches if classifier else 0,
            "texts_classified": classifier.worker.texts_done if classifier else 0,
            "explain": explain_info(cfg, state.explaining),
            "memory": memory.describe(classifier),  # the allocator, oneDNN's cache, the batches' shapes, RSS
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
        # glibc's malloc_trim after each one (serve/memory.py): 0 under another malloc or --malloc_trim_interval 0
        "malloc_trims": explaining.trimmer.trims if explaining and explaining.trimmer else 0,
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
