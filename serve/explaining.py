"""POST /explain's engine: training/explain.py's Integrated Gradients, kept from slowing down /predict.

    explaining = load_explaining("fine-tuned-bert", cfg, device="cpu")   # its own fp32 copy, warmed up
    explanation, seconds = explaining.submit("A wonderful film.", "right").result()   # or Busy: retry later
    explaining.close()                                                   # at shutdown

An explanation costs what n_steps forward and backward passes per class cost (32 for two classes at
the default 32 steps: training/explain.py computes one class fewer): seconds on a CPU, where a prediction takes milliseconds (docs/serving.md has
the numbers). Three rules keep it from starving the predictions:

- **Its own copy of the model, in float32.** Captum hooks the embedding layer of the model it
  explains, which must never be the batching worker's model (its forward passes would run through
  the hooks), and that model may be float16 on a GPU or patched for packed batches on a CPU.
  Integrated Gradients wants float32 anyway: its sum of small gradients loses its completeness in fp16.
- **Its own thread,** one, not the event loop (which would stop answering) and not the batching
  worker (which would stop batching). One thread because Captum's hooks on one model must not
  overlap: two explanations at once on the same copy would run through each other's hooks.
- **A cap.** At most `max_concurrent` explanations are admitted at once (running, or waiting for
  the thread); one more is refused at once with Busy (HTTP 429 with Retry-After), not queued.

Long reviews go through the model in chunks of path points (Captum's internal_batch_size) of about
CHUNK_TOKENS tokens: the same result, a bounded memory (one pass over all 64 points of a 512-token
review holds 5 GB of activations for the backward pass), and places to stop at shutdown.
"""

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future

import torch

from training.explain import Explainer
from model_utils import load_for_inference
from serve.memory import Trimmer

log = logging.getLogger("explain")

# Tokens per chunk of path points: 8 rows (4 steps of 2 classes) of a 512-token review. The
# activations kept for the backward pass grow with rows x tokens (attention's with tokens squared):
# explaining a 512-token review with MiniLM added 0.8 GB to the process at its peak in chunks of
# this size, 1.5 GB in chunks of twice the size, and 5 GB with all 64 rows at once, which was no
# faster on a CPU (docs/serving.md).
CHUNK_TOKENS = 4096
# An explanation's tokens are padded to a multiple of this on a CPU: its shapes, one per length and
# chunk, become a bounded set (docs/serving.md#memory). 16, not the batches' 64: an explanation costs
# n_steps passes over every token, and a short review padded to 64 would cost up to four times as much.
EXPLAIN_PAD_TO_MULTIPLE_OF = 16
WARM_UP_TEXT = "A warm-up review."


class Busy(RuntimeError):
    """max_concurrent explanations are admitted already: retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The server is stopping: an explanation still running is cut short at its next forward pass."""


# -----------------------------------------------------------------------------
# loading


def load_explaining(model_dir, cfg, device):
    """The explainer's own float32 copy of the model, set up and warmed up; the web app's loader.
    `cfg` holds max_concurrent_explains, explain_n_steps and malloc_trim_interval (serve/app.py's ServeConfig).
    An explanation's forward and backward passes are the largest allocations the server makes, in
    this thread's own arena: after each one glibc hands the freed pages back (0: never)."""
    model, tokenizer = load_for_inference(model_dir, device, torch.float32)
    trimmer = Trimmer(cfg.malloc_trim_interval)  # disabled at 0, or under another malloc
    # On a CPU, where oneDNN keeps a primitive per shape, a text is padded to a multiple of 16 tokens
    # (masked; --pad_to_multiple_of 1 turns it off with the batches'): at most 32 lengths for 512 tokens.
    multiple = EXPLAIN_PAD_TO_MULTIPLE_OF if torch.device(device).type == "cpu" and cfg.pad_to_multiple_of > 1 else 1
    explainer = Explainer(model, tokenizer, pad_to_multiple_of=multiple)
    if multiple > 1:
        log.info("explain: a text's tokens are padded to a multiple of %d (masked: the scores do not change), so "
                 "that explanations run a bounded set of shapes (docs/serving.md#memory)", multiple)
    return Explaining(explainer, cfg.max_concurrent_explains, cfg.explain_n_steps, trimmer=trimmer)


# -----------------------------------------------------------------------------
# the explainer behind its thread and its cap


class Explaining:
    """An Explainer (from training/explain.py) run by one thread of its own, with a cap on admitted explanations."""

    def __init__(self, explainer, max_concurrent, n_steps, chunk_tokens=CHUNK_TOKENS, trimmer=None):
        self.explainer = explainer
        self.trimmer = trimmer  # a memory.Trimmer: trims in the thread after each explanation (None: never)
        self.max_concurrent = max_concurrent
        self.n_steps = n_steps
        self.chunk_tokens = chunk_tokens
        self.labels = explainer.labels
        self.lock = threading.Lock()  # guards `admitted`: the event loop admits, the thread releases
        self.admitted = 0  # running or waiting for the thread
        self.running = None  # (perf_counter() at its start, its tokens) of the explanation that runs
        self.last_seconds = None  # how long the last explanation took
        self.seconds_per_token = None  # and per token of its text: what Retry-After is estimated from
        self.explanations = 0  # answered
        self.stopped = 0  # cut short by close()
        self.stopping = threading.Event()
        # Its own model: a hook here can never touch the batching worker's.
        explainer.model.register_forward_pre_hook(self.stop_if_shutting_down)
        self.warm_up()
        self.queue = queue.SimpleQueue()  # (future, text, side); None stops the thread
        # A daemon: a forced exit (a second Ctrl+C) must not wait for an explanation to finish.
        self.thread = threading.Thread(target=self.run, name="explainer", daemon=True)
        self.thread.start()

    def warm_up(self):
        """The first explanation pays one-off costs (allocator, autograd); pay them before serving,
        and time it, so that the first 429 has a Retry-After to give."""
        self.explain(WARM_UP_TEXT, "right")
        self.explanations = 0  # the warm-up is not a request

    def submit(self, text, side):
        """A Future of (Explanation, seconds) for `text` (already through check_texts), cut on `side`
        when too long. Raises Busy when max_concurrent explanations are admitted already."""
        with self.lock:
            if self.admitted >= self.max_concurrent:
                seconds = self.retry_after()
                raise Busy(f"{self.admitted} explanation{'s are' if self.admitted > 1 else ' is'} already running "
                           f"or waiting (the limit, --max_concurrent_explains, is {self.max_concurrent}); "
                           f"retry in {seconds} s.", seconds)
            self.admitted += 1
        future = Future()
        future.add_done_callback(self.release)  # done, failed or cancelled: the slot is free again
        self.queue.put((future, text, side))
        return future

    def release(self, future):
        with self.lock:
            self.admitted -= 1

    def retry_after(self):
        """Whole seconds, at least 1, until the running explanation should end, if each of its tokens
        costs what the last explanation's did: a 500-token review costs some 50 times a 10-token one,
        so the last one's seconds alone would say "1" while a long one runs for half a minute."""
        running = self.running  # one read: the thread may replace it meanwhile
        if running is None:  # admitted, not started yet (or just finished): one more explanation's time
            return max(1, math.ceil(self.last_seconds or 1.0))
        started, tokens = running
        return max(1, math.ceil(self.seconds_per_token * tokens - (time.perf_counter() - started)))

    def run(self):
        while (item := self.queue.get()) is not None:
            future, text, side = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.explain(text, side))
            except ShuttingDown as err:
                self.stopped += 1
                future.set_exception(err)
            except Exception as err:  # a failed model: that caller gets the error (a 500, logged)
                future.set_exception(err)
            if self.trimmer is not None:
                self.trimmer.trim()

    def explain(self, text, side):
        """(Explanation, seconds): every class explained, in chunks of about chunk_tokens tokens."""
        tokens = len(self.explainer.encode(text, side)[0].ids)  # after truncation, [CLS] and [SEP] included
        padded = tokens + self.explainer.padding(tokens)  # what runs: the chunks' rows and the cost follow it
        started = time.perf_counter()
        self.running = (started, padded)
        try:
            explanation = self.explainer.explain(text, n_steps=self.n_steps, truncation_side=side,
                                                 internal_batch_size=self.chunk_rows(padded))
        finally:
            self.running = None
        seconds = time.perf_counter() - started
        self.last_seconds, self.seconds_per_token = seconds, seconds / padded  # per token that ran, padding included
        self.explanations += 1
        return explanation, seconds

    def chunk_rows(self, tokens):
        """Captum's internal_batch_size for a text of `tokens`: path points per forward pass, over all
        classes (k rows per step), about chunk_tokens tokens in all; None (one pass) when all fit in one."""
        k = self.explainer.rows_per_point()
        if k * self.n_steps * tokens <= self.chunk_tokens:
            return None
        return k * max(1, self.chunk_tokens // (k * tokens))  # a whole number of steps: k rows each

    def stop_if_shutting_down(self, module, args):
        """A forward pre-hook on the explainer's model: once close() is called, the next chunk stops."""
        if self.stopping.is_set():
            raise ShuttingDown("the server is shutting down; this explanation was stopped.")

    def close(self):
        """Stop the running explanation at its next chunk, and any waiting at their first, end the thread."""
        self.stopping.set()
        self.queue.put(None)
        self.thread.join()
        log.info("explainer stopped (explanations answered: %d, stopped by the shutdown: %d)",
                 self.explanations, self.stopped)


# -----------------------------------------------------------------------------
# the answer


def to_answer(explanation, seconds):
    """POST /explain's body (serve/http_types.py's ExplainResponse) from an explain.Explanation."""
    scores = explanation.scores
    return {
        "prediction": {"label": explanation.label, "score": scores[explanation.label], "scores": scores},
        "words": [{"text": word.text, "start": word.start, "end": word.end,
                   "attributions": {name: explanation.attributions[name][i] for name in explanation.attributions}}
                  for i, word in enumerate(explanation.words)],
        "truncated": explanation.truncated,
        "num_tokens": len(explanation.tokens),
        "max_length": explanation.max_length,
        "n_steps": explanation.n_steps,
        "deltas": explanation.deltas,
        "baseline_scores": explanation.baseline_scores,
        "seconds": seconds,
    }
