"""The batching worker and the limits it enforces: the serving core, shared by the web app
(serve/app.py) and the command line (serve/predict.py).

One worker thread owns the model. Callers put their inputs (tokenized texts) on a queue and get a
future back; the worker takes whatever is waiting, waits a few milliseconds for more when more are
likely to come (up to a batch limit), runs them as one batch, and hands each caller its own rows.
Why one worker: on a CPU, 16 requests run one at a time cost 16 forward passes of small matrices,
while one batch of 16 uses the cores far better (docs/serving.md).

The worker knows nothing of models: it calls `predict_fn(inputs) -> (B, num_labels) scores` on
whatever its callers queue (token ids, from serve/classifier.py, which also supplies the function).
serve/app.py checks each request with `check_texts` before it reaches the queue. Each job records
how long its inputs waited in the queue and how long their batches ran (the /metrics histograms
and timing headers, as Text Embeddings Inference reports them).
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Optional


log = logging.getLogger("batching")


# -----------------------------------------------------------------------------
# limits


@dataclass
class Limits:
    max_inputs: int = field(default=32, metadata={"help": "texts per request (TEI's default)"})
    max_chars: int = field(
        default=100_000,
        metadata={"help": "characters per text; 512 tokens hold ~2-3k characters, so truncation applies first"},
    )
    max_batch_size: int = field(default=32, metadata={"help": "texts per forward pass"})
    max_wait_ms: float = field(
        default=5.0,
        metadata={"help": "the longest the worker waits for more texts, while fewer are in its batch than were "
                          "in flight when the last one ended"},
    )
    max_queue: int = field(default=512, metadata={"help": "texts waiting at once; beyond this, requests get 429"})
    packed: bool = field(
        default=True,
        metadata={"help": "on a CPU, run each batch of a BERT model with no padding: its texts end to end, "
                          "attention per text (--packed false: padded batches, split by length)"},
    )
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = field(
        default=None,
        metadata={"help": "the weights' number format; default: float16 on a GPU (as Text Embeddings Inference), "
                          "float32 on a CPU"},
    )
    forward_cost_tokens: int = field(
        default=None,
        metadata={"help": "for padded batches: what one more forward pass costs, in padded tokens; a batch is "
                          "split by length where the padding saved is worth more. Default: 128 on CPU, no split "
                          "on a GPU"},
    )
    # Every new shape makes oneDNN create (and cache, up to 1,024) a GELU primitive, and those long-lived
    # blocks kept glibc from reusing or returning the activations freed around them: the memory grew
    # for good (serve/memory.py). At 64, a BERT of 512 tokens has at most 760 shapes (512 up to its
    # maximum, 248 more above it), every one of them cached and created once; the price is under 64
    # [PAD] tokens a packed batch, under 64 a row of a padded one.
    pad_to_multiple_of: int = field(
        default=64,
        metadata={"help": "on a CPU, a batch of more than one text is padded to a multiple of this many tokens (a "
                          "packed batch over the model's maximum in all, a padded one per row): a bounded set of "
                          "shapes, each created once by oneDNN, so that the server's memory stops growing "
                          "(docs/serving.md#memory). 1: no padding"},
    )

    malloc_trim_interval: float = field(
        default=10.0,
        metadata={"help": "seconds between two calls of glibc's malloc_trim, made after a batch is answered: the "
                          "memory freed inside the allocator's arenas goes back to the OS, so the resident size "
                          "does not stay at the largest batch seen (docs/serving.md#memory). 0: never"},
    )

    def __post_init__(self):
        if not self.malloc_trim_interval >= 0:  # a ValueError: python -m serve says it and exits 2
            raise ValueError(f"--malloc_trim_interval must be 0 (never) or a number of seconds, not "
                             f"{self.malloc_trim_interval}")
        if self.pad_to_multiple_of < 1:  # a ValueError: python -m serve says it and exits 2
            raise ValueError(f"--pad_to_multiple_of must be a positive integer (1: no padding), not "
                             f"{self.pad_to_multiple_of}")


class InputError(ValueError):
    """A request the caller must fix. `status` is the HTTP code the web app answers with; `error_type`
    the class of problem in TEI's words ("Validation", or "Empty" for an empty text in TEI's API)."""

    def __init__(self, status, message, error_type="Validation"):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry later (HTTP 429)."""


def check_texts(texts, limits, name=lambda i: f"texts[{i}]"):
    """Raise InputError unless `texts` is a non-empty list of classifiable texts within the limits.

    Size limits answer 413 like TEI's ("payload too large"); content problems 422.
    """
    if len(texts) == 0:
        raise InputError(422, "'texts' is empty: send at least one text.")
    if len(texts) > limits.max_inputs:
        raise InputError(
            413, f"{len(texts)} texts in one request; the limit is {limits.max_inputs}. Send several requests."
        )
    for i, text in enumerate(texts):
        check_text(text, limits, name(i))


def check_text(text, limits, name):
    if len(text) > limits.max_chars:
        raise InputError(
            413,
            f"{name} has {len(text)} characters; the limit is {limits.max_chars}. "
            "(Longer reviews are truncated to the model's maximum anyway, so send the beginning.)",
        )
    if not text.strip():
        raise InputError(422, f"{name} is empty or whitespace only: there is nothing to classify.")
    if not is_encodable(text):
        raise InputError(422, f"{name} is not valid Unicode: it holds an unpaired surrogate (\\ud800-\\udfff).")


def is_encodable(text):
    """False for a string with a lone surrogate (JSON allows "\\ud83d" alone; UTF-8 and the tokenizer do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -----------------------------------------------------------------------------
# the batching worker


class Job:
    """One caller's inputs: filled row by row (a job may span two batches), resolved when complete.

    The timings are sums over its inputs (divide by len(inputs) for a mean, as TEI's headers give
    for a batch request): seconds from submit() until the input's batch started, and its batch's run.
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.rows = [None] * len(inputs)
        self.missing = len(inputs)
        self.future = Future()
        self.queued_at = time.perf_counter()
        self.queue_seconds = 0.0
        self.inference_seconds = 0.0

    def set_row(self, index, row):
        self.rows[index] = row
        self.missing -= 1
        if self.missing == 0:
            self.future.set_result(self.rows)

    def fail(self, err):
        if not self.future.done():
            self.future.set_exception(err)


STOP = object()  # queued by close(): the worker finishes what is queued before it, then exits


class BatchWorker:
    """The one thread that calls `predict_fn(inputs) -> (B, num_labels) scores`.

    on_batch(inputs, seconds), if given, hears of every batch that ran without error, from the worker
    thread (the metrics).
    """

    def __init__(self, predict_fn, limits, on_batch=None, after_batch=None):
        self.predict_fn = predict_fn
        self.limits = limits
        self.on_batch = on_batch
        self.after_batch = after_batch  # called in this thread once a batch is answered (serve/memory.py's Trimmer)
        self.queue = queue.SimpleQueue()  # (job, row index), one item per text
        self.lock = threading.Lock()  # guards `waiting` and `closed` against concurrent submitters
        self.waiting = 0
        self.expected = 0  # texts in flight when the last batch ended: what the next gather() waits for
        self.closed = False
        self.batches = 0
        self.texts_done = 0
        self.thread = threading.Thread(target=self.run, name="batch-worker", daemon=True)
        self.thread.start()

    def submit(self, inputs):
        """Queue `inputs`; returns a Future of their score rows, in order. Raises Overloaded."""
        return self.submit_job(inputs).future

    def submit_job(self, inputs):
        """Queue `inputs`; returns their Job (its future, and its timings once resolved). Raises Overloaded."""
        with self.lock:
            if self.closed:
                raise Overloaded("the server is shutting down.")
            if self.waiting + len(inputs) > self.limits.max_queue:
                raise Overloaded(
                    f"{self.waiting} texts are already waiting (limit {self.limits.max_queue}); retry shortly."
                )
            self.waiting += len(inputs)
        job = Job(inputs)
        for index in range(len(inputs)):
            self.queue.put((job, index))
        return job

    def queued(self):
        """Inputs waiting for a batch, not counting the batch that runs: TEI's te_queue_size."""
        return self.queue.qsize()

    def close(self):
        with self.lock:
            self.closed = True
        self.queue.put(STOP)
        self.thread.join()

    def run(self):
        while (batch := self.gather()) is not None:
            self.run_batch(batch)
            if self.after_batch is not None:
                self.after_batch()

    def report(self, inputs, seconds):
        """on_batch, which must not stop the worker: a failing hook is logged, and serving goes on."""
        try:
            self.on_batch(inputs, seconds)
        except Exception:
            log.exception("on_batch failed; the batch's answers are not affected")

    def gather(self):
        """Block for the first text, then take whatever is queued, waiting up to max_wait_ms for more
        while the batch holds fewer texts than were in flight when the last batch ended.

        Why that target: callers that got an answer usually send again at once (a client waiting on
        each answer, a page, a script), so the texts in flight at the end of a batch predict the next
        one's size. With 16 such clients the worker waits for all 16 instead of running half now and
        half later; with one, it runs each text at once instead of waiting out the window for nobody.
        """
        first = self.queue.get()
        if first is STOP:
            return None
        batch = [first]
        target = self.expected
        deadline = time.monotonic() + self.limits.max_wait_ms / 1000
        while len(batch) < self.limits.max_batch_size:
            wait = max(deadline - time.monotonic(), 0) if len(batch) < target else 0  # then only what is queued
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                break
            if item is STOP:
                self.queue.put(STOP)  # run this batch first, exit on the next gather()
                break
            batch.append(item)
        return batch

    def run_batch(self, batch):
        inputs = [job.inputs[index] for job, index in batch]
        started = time.perf_counter()
        try:
            rows, failure = self.predict_fn(inputs).tolist(), None
        except Exception as err:  # e.g. out of memory: every caller in this batch gets the error
            rows, failure = None, err
        seconds = time.perf_counter() - started
        # Free the queue space before answering: a caller that has its answer may send again at once.
        with self.lock:
            self.expected = self.waiting  # this batch and the texts queued behind it
            self.waiting -= len(batch)
        self.batches += 1
        self.texts_done += len(batch)
        if self.on_batch is not None and failure is None:
            self.report(inputs, seconds)
        for i, (job, index) in enumerate(batch):
            job.queue_seconds += started - job.queued_at  # before set_row: the last row resolves the future
            job.inference_seconds += seconds
            if failure is None:
                job.set_row(index, rows[i])
            else:
                job.fail(failure)
