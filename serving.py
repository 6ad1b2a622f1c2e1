"""Batched inference shared by the web app (app.py) and the command line (predict.py).

One worker thread owns the model. Callers put texts on a queue and get a future back; the worker
takes whatever is waiting, waits a few milliseconds for more when more are likely to come (up to a
batch limit), runs them as one batch under `torch.inference_mode`, and hands each caller its own
rows. Why one worker: on a CPU, 16 requests run one at a time cost 16 forward passes of small
matrices, while one batch of 16 uses the cores far better (about 2x here; on a GPU far more); and
the tokenizer is used by one thread only (it is not thread-safe across differing settings in
transformers 5).

How a batch runs: on a CPU a BERT batch is packed, with no padding at all (`classify_packed`);
elsewhere it is padded, and split by length where that saves time (`classify_by_length`)."""

import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from model_utils import classify, count_parameters, label_names, load_for_inference, model_max_length


# -----------------------------------------------------------------------------
# limits

CPU_FORWARD_COST_TOKENS = 128  # ~18 ms fixed per forward vs ~0.14 ms per token: minilm-l6, 2 cores (BENCHMARKS.md)


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


# -----------------------------------------------------------------------------
# the model call, packed: no padding at all (a BERT model on a CPU)
#
# A padded batch of texts of 30 and 120 tokens computes 120 rows for each. Packing lays the texts'
# tokens end to end as one sequence of exactly the real tokens instead. Everything in a BERT layer
# but attention works on each token alone (the Q/K/V, output and feed-forward matrices, LayerNorm),
# so those matmuls, most of the work, run once on one tall matrix with no wasted rows. Attention
# must not mix texts: `packed_sdpa` runs it text by text, between the offsets in `cu_seq_lens_q`
# (the name flash-attention's variable-length kernels use; TEI packs BERT batches with those on GPUs).

PACKED_ATTENTION = "packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """transformers' SDPA attention, except for a packed batch: then each text attends to itself only.

    query, key, value: (1, heads, total tokens, head size); returns (1, total tokens, heads, head size).
    """
    if cu_seq_lens_q is None:  # an ordinary padded batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if module.training or module.is_causal:
        raise NotImplementedError("packed attention runs an encoder in eval mode: no dropout, no causal mask")
    out = torch.empty_like(query)
    for start, end in pairwise(cu_seq_lens_q.tolist()):
        span = slice(start, end)
        out[:, :, span] = F.scaled_dot_product_attention(query[:, :, span], key[:, :, span], value[:, :, span],
                                                         scale=scaling)
    return out.transpose(1, 2), None


# Registered by name, like "sdpa": model.set_attn_implementation(PACKED_ATTENTION) then routes every
# attention layer here. Padded batches build their mask as for "sdpa".
AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def can_pack(model):
    """Packing needs to know the model's layout: BERT's embeddings, encoder, pooler and classifier,
    with bidirectional attention (a BERT configured as a decoder attends causally)."""
    return type(model) is BertForSequenceClassification and not model.config.is_decoder


def use_packed_attention(model):
    """Route the model's attention layers to packed_sdpa; False where transformers cannot (it then
    only logs a warning, e.g. when it cannot read the model's source), so the caller must check."""
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION


@torch.inference_mode()
def classify_packed(model, tokenizer, texts, max_length):
    """Probabilities (len(texts), num_labels) in input order, from one forward pass with no padding.

    The model must use PACKED_ATTENTION. This is BertForSequenceClassification.forward, taken apart
    where it assumes one text per row: positions restart at 0 for each text, and the pooler reads
    each text's [CLS] token, not the first row's.
    """
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(row) for row in ids]
    device = model.device
    input_ids = torch.tensor(list(chain.from_iterable(ids)), device=device)[None]  # (1, total tokens)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    starts = torch.tensor([0, *accumulate(lengths)], device=device)  # text i is tokens starts[i]:starts[i + 1]
    bert = model.bert
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids)  # token types: all 0, one text each
    hidden = bert.encoder(hidden, cu_seq_lens_q=starts, cu_seq_lens_k=starts).last_hidden_state
    cls = hidden[0, starts[:-1]]  # (texts, hidden): each text's first token, [CLS]
    pooled = bert.pooler(cls[:, None])  # the pooler takes position 0 of a (texts, 1, hidden) batch
    logits = model.classifier(model.dropout(pooled))
    return logits.float().softmax(dim=-1)


# -----------------------------------------------------------------------------
# the model call, padded: one gathered batch, split by length


def classify_by_length(model, tokenizer, texts, max_length, forward_cost_tokens):
    """Probabilities (len(texts), num_labels) in input order, computed in chunks of similar length.

    A padded batch costs about (texts x longest text) tokens. Gathered requests have mixed lengths
    (25 to 128 tokens, say), so one batch would spend a third of its time on padding; sorting and
    cutting it where that saves more than a forward pass costs gets most of that back on a CPU.
    """
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    probs = torch.empty(len(texts), model.config.num_labels)
    for start, end in split_by_length([lengths[i] for i in order], forward_cost_tokens):
        rows = order[start:end]
        probs[rows] = classify(model, tokenizer, [texts[i] for i in rows], max_length).cpu()
    return probs


def split_by_length(sorted_lengths, forward_cost_tokens):
    """Cut sorted lengths into consecutive chunks minimising sum(forward_cost + size x longest).

    Dynamic programming over cut points: best[end] is the cheapest way to run the first `end`.
    """
    n = len(sorted_lengths)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + forward_cost_tokens + (end - start) * sorted_lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end > 0:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]


# -----------------------------------------------------------------------------
# a loaded model behind a worker


def to_prediction(probs, labels):
    """One row of probabilities -> {"label", "score", "scores"} with the model's label names."""
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs))}


class Classifier:
    """A model folder loaded once, warmed up, and served through one BatchWorker."""

    def __init__(self, model_dir, limits, device="cpu"):
        model, tokenizer = load_for_inference(model_dir, device)
        self.model_dir = model_dir
        self.labels = label_names(model)
        self.max_length = model_max_length(model, tokenizer)
        self.num_parameters = count_parameters(model)
        self.limits = limits
        # A GPU computes padded rows in parallel, nearly free, and would pay for the per-text attention
        # loop in kernel launches: packing is for the CPU, where every padded row costs its full share.
        self.packed = limits.packed and model.device.type == "cpu" and can_pack(model) and use_packed_attention(model)
        if self.packed:
            predict_fn = partial(classify_packed, model, tokenizer, max_length=self.max_length)
        else:
            cost = limits.forward_cost_tokens
            if cost is None:  # padding is nearly free on a GPU (above): never split there
                cost = CPU_FORWARD_COST_TOKENS if model.device.type == "cpu" else 1_000_000
            predict_fn = partial(classify_by_length, model, tokenizer, max_length=self.max_length,
                                 forward_cost_tokens=cost)
        self.worker = BatchWorker(predict_fn, limits)
        self.warm_up()

    def warm_up(self):
        """The first forward pass pays one-off costs (allocator, kernels); pay them before serving."""
        self.worker.submit(["A warm-up review.", "word " * self.max_length]).result()

    def submit(self, texts):
        """Queue `texts` (already through check_texts); a Future of their probability rows, in order.
        Raises Overloaded when the queue is full."""
        return self.worker.submit(texts)

    def predict(self, texts):
        """Blocking: predictions for `texts`, in order."""
        return [to_prediction(row, self.labels) for row in self.submit(texts).result()]

    def close(self):
        self.worker.close()
