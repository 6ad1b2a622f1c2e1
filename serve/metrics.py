"""What the server says about itself: Prometheus metrics at GET /metrics, and for every request an
x-request-id header and one log line.

    curl -s localhost:8000/metrics | grep -E '^te_(request_count|queue_size)'

The metrics are prometheus_client's, in a registry of the app's own (so several apps in one process,
as in the tests, count apart). Where Text Embeddings Inference has a metric for the same thing, it
has TEI's name, labels and buckets (router/src/lib.rs and prometheus.rs, core/src/infer.rs and
queue.rs), so a TEI dashboard reads this server too. One difference: prometheus_client writes a
counter's samples as `<name>_total` (the OpenMetrics rule), so TEI's `te_request_count` is queried
here as `te_request_count_total`. Our own metrics, for what TEI does not count, start with `serve_`.
"""

import logging
import re
import time
import uuid

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.datastructures import MutableHeaders

log = logging.getLogger("access")

# TEI's buckets (router/src/prometheus.rs): durations from 15 µs to 15 s, each 1.5 times the last;
# batch sizes and token counts in powers of two. TEI stops the input lengths at the model's maximum,
# which is not known before the model loads: up to 8192 tokens here (BERT's maximum is 512).
DURATION_BUCKETS = tuple(float(f"{0.00001 * 1.5**k:.6g}") for k in range(1, 36))
BATCH_SIZE_BUCKETS = tuple(2.0**k for k in range(13))
BATCH_TOKENS_BUCKETS = tuple(2.0**k for k in range(21))
INPUT_LENGTH_BUCKETS = tuple(2.0**k for k in range(14))


# -----------------------------------------------------------------------------
# the metrics


class Metrics:
    """Every metric the app reports. te_request_* count classification requests whose body parsed
    (POST /predict and POST /), as TEI's do; each ends in exactly one success or one failure."""

    def __init__(self):
        # TEI exposes no `<name>_created` series (a counter's creation time), which would double the
        # lines of a scrape. The switch is prometheus_client's, for the whole process: ours.
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("serve_http_requests", "HTTP requests answered, every route",
                                     ["route", "method", "status"], registry=r)
        self.request_count = Counter("te_request_count", "classification requests", ["method"], registry=r)
        self.request_success = Counter("te_request_success", "classification requests answered 200", ["method"],
                                       registry=r)
        self.request_failure = Counter("te_request_failure", "classification requests refused or failed", ["err"],
                                       registry=r)
        self.request_duration = Histogram("te_request_duration", "seconds per answered classification request, "
                                          "from its parsed body to its answer", buckets=DURATION_BUCKETS, registry=r)
        self.tokenization_duration = Histogram("te_request_tokenization_duration", "seconds spent tokenizing, "
                                               "per request", buckets=DURATION_BUCKETS, registry=r)
        self.queue_duration = Histogram("te_request_queue_duration", "seconds a request's texts waited for a batch "
                                        "(the mean over its texts)", buckets=DURATION_BUCKETS, registry=r)
        self.inference_duration = Histogram("te_request_inference_duration", "seconds a request's texts spent in "
                                            "the model (the mean over its texts)", buckets=DURATION_BUCKETS, registry=r)
        self.input_length = Histogram("te_request_input_length", "tokens per text, after truncation",
                                      buckets=INPUT_LENGTH_BUCKETS, registry=r)
        self.batch_size = Histogram("te_batch_next_size", "texts per batch run", buckets=BATCH_SIZE_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("te_batch_next_tokens", "tokens per batch run", buckets=BATCH_TOKENS_BUCKETS,
                                      registry=r)
        self.queue_size = Gauge("te_queue_size", "texts waiting for a batch (not those in the batch running)",
                                registry=r)
        self.texts_classified = Counter("te_predict_success", "texts classified (TEI counts per input)", registry=r)
        self.tokens_classified = Counter("serve_tokens_classified", "tokens classified, after truncation", registry=r)

    def watch_queue(self, queued):
        """te_queue_size reads `queued()` at each scrape: the depth now, not at the last batch."""
        self.queue_size.set_function(queued)

    def batch_done(self, texts, seconds):
        """BatchWorker's on_batch: `texts` are the batch's serve.classifier.Text, tokenized."""
        self.batch_size.observe(len(texts))
        self.batch_tokens.observe(sum(len(text.ids) for text in texts))

    def answered(self, method, ids, seconds):
        """A classification request answered 200. `seconds`: (total, tokenization, queue, inference)."""
        total, tokenization, queued, inference = seconds
        self.request_success.labels(method).inc()
        self.request_duration.observe(total)
        self.tokenization_duration.observe(tokenization)
        self.queue_duration.observe(queued)
        self.inference_duration.observe(inference)
        for row in ids:
            self.input_length.observe(len(row))
        self.texts_classified.inc(len(ids))
        self.tokens_classified.inc(sum(len(row) for row in ids))

    def render(self):
        """(body, content type) in Prometheus' text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -----------------------------------------------------------------------------
# request ids, the per-request log line, requests by route and status

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what a caller's id may be: no spaces, no line breaks


class RequestLog:
    """ASGI middleware: give each request an id (the caller's x-request-id, else a new one), send it
    back as x-request-id, count the answer in serve_http_requests, and log one line:

        127.0.0.1:51234 "POST /predict HTTP/1.1" 200 23.4 ms request_id=3f2a...

    `routes`: the app's paths; any other path is counted as "unmatched", so that a scan of random
    URLs cannot grow the metric without bound."""

    def __init__(self, app, metrics, routes, access_log=True):
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = caller_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id in a route
        status = 500  # unless an answer starts: an exception escapes to Starlette's 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.finished(scope, status, time.perf_counter() - started, request_id)

    def finished(self, scope, status, seconds, request_id):
        route = scope["path"] if scope["path"] in self.routes else "unmatched"
        self.metrics.http_requests.labels(route, scope["method"], str(status)).inc()
        if self.access_log:
            client = "%s:%d" % tuple(scope["client"]) if scope.get("client") else "-"
            log.info('%s "%s %s HTTP/%s" %d %.1f ms request_id=%s', client, scope["method"], scope["path"],
                     scope.get("http_version", "1.1"), status, seconds * 1000, request_id)


def caller_request_id(scope):
    """The caller's x-request-id if it is a plain token (it goes into our log lines), else None."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID.fullmatch(text) else None
    return None
