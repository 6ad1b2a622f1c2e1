"""The batching worker and the limits it enforces: the serving core, shared by the web app
(serve/app.py) and the command line (serve/predict.py).

One worker thread owns the model. Callers put texts on a queue and get a future back; the worker
takes whatever is waiting, waits a few milliseconds for more when more are likely to come (up to a
batch limit), runs them as one batch, and hands each caller its own rows. Why one worker: on a
CPU, 16 requests run one at a time cost 16 forward passes of small matrices, while one batch of 16
uses the cores far better (docs/serving.md); and the tokenizer is used by one thread only (it is
not thread-safe across differing settings in transformers 5).

The worker knows nothing of models: it calls `predict_fn(texts) -> (B, num_labels) probabilities`.
serve/classifier.py supplies that function; serve/app.py checks each request with `check_texts`
before it reaches the queue.
"""

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Optional


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


class InputError(ValueError):
    """A request the caller must fix. `status` is the HTTP code the web app answers with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


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
    """One caller's texts: filled row by row (a job may span two batches), resolved when complete."""

    def __init__(self, texts):
        self.texts = texts
        self.rows = [None] * len(texts)
        self.missing = len(texts)
        self.future = Future()

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
    """The one thread that calls `predict_fn(texts) -> (B, num_labels) probabilities`."""

    def __init__(self, predict_fn, limits):
        self.predict_fn = predict_fn
        self.limits = limits
        self.queue = queue.SimpleQueue()  # (job, row index), one item per text
        self.lock = threading.Lock()  # guards `waiting` and `closed` against concurrent submitters
        self.waiting = 0
        self.expected = 0  # texts in flight when the last batch ended: what the next gather() waits for
        self.closed = False
        self.batches = 0
        self.texts_done = 0
        self.thread = threading.Thread(target=self.run, name="batch-worker", daemon=True)
        self.thread.start()

    def submit(self, texts):
        """Queue `texts`; returns a Future of their probability rows, in order. Raises Overloaded."""
        with self.lock:
            if self.closed:
                raise Overloaded("the server is shutting down.")
            if self.waiting + len(texts) > self.limits.max_queue:
                raise Overloaded(
                    f"{self.waiting} texts are already waiting (limit {self.limits.max_queue}); retry shortly."
                )
            self.waiting += len(texts)
        job = Job(texts)
        for index in range(len(texts)):
            self.queue.put((job, index))
        return job.future

    def close(self):
        with self.lock:
            self.closed = True
        self.queue.put(STOP)
        self.thread.join()

    def run(self):
        while (batch := self.gather()) is not None:
            self.run_batch(batch)

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
        try:
            probs, failure = self.predict_fn([job.texts[index] for job, index in batch]).tolist(), None
        except Exception as err:  # e.g. out of memory: every caller in this batch gets the error
            probs, failure = None, err
        # Free the queue space before answering: a caller that has its answer may send again at once.
        with self.lock:
            self.expected = self.waiting  # this batch and the texts queued behind it
            self.waiting -= len(batch)
        self.batches += 1
        self.texts_done += len(batch)
        for i, (job, index) in enumerate(batch):
            if failure is None:
                job.set_row(index, probs[i])
            else:
                job.fail(failure)
