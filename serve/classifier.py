"""A trained model folder behind the batching worker: what the web app and the command line serve.

    classifier = Classifier("fine-tuned-bert", Limits(), device="cpu")
    classifier.predict(["A wonderful film."])   # [{"label": "pos", "score": 0.97, "scores": {...}}]

The worker's inputs are `Text`s. It tokenizes each batch in one call per truncation side (the texts
cut from the right, those cut from the left), then runs the model and hands back each text's logits.
Why in the worker, where Text Embeddings Inference tokenizes each request before its queue: a
request that is tokenized on its way in (~0.15 ms for a review) delays every request behind it, and
16 requests in a row then missed the few milliseconds the worker waits for them, making batches a
third smaller (BENCHMARKS.md). A text that must be refused when too long (TEI's truncate: false) is
tokenized before it is queued, the one case where the length must be known first (`encode`).

The tokenizers are the fast tokenizer's Rust core, set up once per way of truncating and never
changed afterwards, so any thread may use them (transformers' own call changes its tokenizer's
settings at every call, which is what makes it unsafe to share between threads).

How a batch runs: on a CPU a BERT batch is packed, with no padding at all (serve/packed.py);
elsewhere it is padded, and split by length where that saves time (`classify_by_length`).
"""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import torch

from model_utils import bare_tokenizer, count_parameters, device_name, label_names, load_for_inference, model_max_length
from serve.batching import BatchWorker, InputError
from serve.memory import Trimmer
from serve.memory import log_setup as log_memory_setup
from serve.packed import can_pack, classify_packed, use_packed_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_dtype(device):
    """float16 on a GPU (as Text Embeddings Inference serves there), float32 elsewhere."""
    return "float16" if torch.device(device).type == "cuda" else "float32"


# What one more forward pass costs, in padded tokens, when a padded batch is split by length on a
# CPU: its fixed cost over its cost per token, measured with MiniLM on 2 cores (BENCHMARKS.md).
CPU_FORWARD_COST_TOKENS = 128


# -----------------------------------------------------------------------------
# the model call, padded: one gathered batch, split by length


def classify_by_length(model, ids, pad_token_id, forward_cost_tokens, max_length=512, multiple=1):
    """Logits (len(ids), num_labels) in float32, in input order, computed in chunks of similar length.

    A padded batch costs about (texts x longest text) tokens. Gathered requests have mixed lengths
    (25 to 128 tokens, say), so one batch would spend a third of its time on padding; sorting and
    cutting it where that saves more than a forward pass costs gets most of that back on a CPU.
    A chunk of several texts is padded to a multiple of `multiple` tokens (padded_length: why).
    """
    lengths = [len(row) for row in ids]
    order = sorted(range(len(ids)), key=lengths.__getitem__)
    logits = torch.empty(len(ids), model.config.num_labels)
    width = partial(padded_length, max_length=max_length, multiple=multiple)
    for start, end in split_by_length([lengths[i] for i in order], forward_cost_tokens, width):
        rows = order[start:end]
        chunk = [ids[i] for i in rows]
        logits[rows] = forward_padded(model, chunk, pad_token_id, width(len(chunk), lengths[rows[-1]])).cpu()
    return logits


def padded_length(texts, longest, max_length=512, multiple=1):
    """The length a padded chunk of `texts` texts is padded to: a text alone, its own; several, the
    longest rounded up to a multiple of `multiple`, at most the model's maximum. So a chunk has one of
    a bounded set of shapes, (texts, length), each of which oneDNN creates once (docs/serving.md#memory)."""
    return longest if texts == 1 else min(-(-longest // multiple) * multiple, max(longest, max_length))


@torch.inference_mode()
def forward_padded(model, ids, pad_token_id, longest=None):
    """One forward pass over `ids` padded on the right to `longest` (default: the longest): logits
    (B, num_labels) in fp32, whatever the model's dtype. (Token types are left to the model: all 0.)"""
    longest = longest or max(len(row) for row in ids)
    pad_token_id = 0 if pad_token_id is None else pad_token_id  # masked out: any id does (a model may have none)
    input_ids = torch.tensor([row + [pad_token_id] * (longest - len(row)) for row in ids], device=model.device)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids], device=model.device)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def split_by_length(sorted_lengths, forward_cost_tokens, width=lambda texts, longest: longest):
    """Cut sorted lengths into consecutive chunks minimising sum(forward_cost + size x width), where
    width(size, longest) is the length a chunk is padded to (its longest, or more: padded_length).

    Dynamic programming over cut points: best[end] is the cheapest way to run the first `end`.
    """
    n = len(sorted_lengths)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + forward_cost_tokens + (end - start) * width(end - start, sorted_lengths[end - 1])
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end > 0:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]


# -----------------------------------------------------------------------------
# tokenizing: what the worker queues, and tokenizers that threads may share


@dataclass
class Text:
    """One text through the worker. The batch fills in its token ids, unless they came with it, and
    the seconds its batch spent tokenizing (TEI's x-tokenization-time)."""

    text: str
    side: Literal["right", "left"] = "right"  # the end that goes when the text is over the model's maximum
    ids: Optional[list] = None
    tokenization_seconds: float = 0.0


def tokenize_batch(tokenizers, texts):
    """Fill in the ids of the texts that have none: one encode_batch call per truncation side."""
    started = time.perf_counter()
    for side in ("right", "left"):
        todo = [t for t in texts if t.ids is None and t.side == side]
        if todo:
            for text, encoding in zip(todo, tokenizers[side].encode_batch([t.text for t in todo])):
                text.ids = encoding.ids
    seconds = time.perf_counter() - started
    for text in texts:
        text.tokenization_seconds = seconds


def classify_texts(tokenizers, classify_ids, texts):
    """The worker's batch: tokenize, then logits (len(texts), num_labels) from `classify_ids`."""
    tokenize_batch(tokenizers, texts)
    return classify_ids([t.ids for t in texts])


def rust_tokenizers(tokenizer, max_length):
    """The fast tokenizer's Rust core in three copies: cutting texts over `max_length` tokens from
    the right, from the left, or not at all (None). They give the ids transformers' call gives."""
    cores = {}
    for side in ("right", "left", None):
        core = bare_tokenizer(tokenizer)
        if side is not None:
            core.enable_truncation(max_length, direction=side)
        cores[side] = core
    return cores


# -----------------------------------------------------------------------------
# scores from logits


def softmax(logits):
    """One row of logits -> probabilities, in float64 (the max is subtracted first: no overflow)."""
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def sigmoid(logits):
    return [1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x)) for x in logits]


def to_prediction(probs, labels):
    """One row of probabilities -> {"label", "score", "scores"} with the model's label names."""
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "scores": dict(zip(labels, probs))}


# -----------------------------------------------------------------------------
# a loaded model behind a worker


class Classifier:
    """A model folder loaded once, warmed up, and served through one BatchWorker (and a thread that
    tokenizes the long texts that must not be truncated)."""

    def __init__(self, model_dir, limits, device="cpu"):
        model, tokenizer = load_for_inference(model_dir, device, DTYPES[limits.dtype or default_dtype(device)])
        self.model_dir = model_dir
        self.config = model.config
        self.dtype = str(model.dtype).removeprefix("torch.")  # as loaded: what /info reports
        self.device_name = device_name(model.device)
        self.device_type = model.device.type
        self.labels = label_names(model)
        self.max_length = model_max_length(model, tokenizer)
        self.num_parameters = count_parameters(model)
        self.limits = limits
        self.model = model  # for reading only: the worker thread is the one that runs it
        self.tokenizers = rust_tokenizers(tokenizer, self.max_length)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        # A GPU computes padded rows in parallel, nearly free, and would pay for the per-text attention
        # loop in kernel launches: packing is for the CPU, where every padded row costs its full share.
        self.packed = limits.packed and model.device.type == "cpu" and can_pack(model) and use_packed_attention(model)
        batch = partial(classify_texts, self.tokenizers, self.classify_ids_fn(model, tokenizer.pad_token_id))
        self.trimmer = Trimmer(limits.malloc_trim_interval)  # the pages freed in glibc's arenas, handed back
        self.worker = BatchWorker(batch, limits, after_batch=self.trimmer)
        log_memory_setup(self)  # the allocator, and the batches' shapes against oneDNN's cache (serve/memory.py)
        self.warm_up()

    def classify_ids_fn(self, model, pad_token_id):
        """How a batch of token ids runs: packed on a CPU for a BERT, else padded."""
        # oneDNN's cache of a primitive per shape is the CPU's (serve/memory.py); a GPU pads to the longest.
        multiple = self.limits.pad_to_multiple_of if model.device.type == "cpu" else 1
        if self.packed:
            return partial(classify_packed, model, max_length=self.max_length, multiple=multiple)
        cost = self.limits.forward_cost_tokens
        if cost is None:  # padding is nearly free on a GPU (above): never split there
            cost = CPU_FORWARD_COST_TOKENS if model.device.type == "cpu" else 1_000_000
        return partial(classify_by_length, model, pad_token_id=pad_token_id, forward_cost_tokens=cost,
                       max_length=self.max_length, multiple=multiple)

    def warm_up(self):
        """The first forward pass pays one-off costs (allocator, kernels); pay them before serving."""
        self.submit(["A warm-up review.", "word " * self.max_length]).result()

    def encode_async(self, texts, name=lambda i: f"texts[{i}]"):
        """A Future of `encode`, computed in the tokenizer thread: for long texts, which take tens of
        milliseconds (the web app's event loop would serve no one meanwhile)."""
        return self.tokenizing.submit(self.encode, texts, name)

    def encode(self, texts, name=lambda i: f"texts[{i}]"):
        """Token ids per text, special tokens included, for texts that must not be truncated (TEI's
        truncate: false): a text over the model's maximum is refused with TEI's 422."""
        ids = [encoding.ids for encoding in self.tokenizers[None].encode_batch(texts)]
        for i, row in enumerate(ids):
            if len(row) > self.max_length:
                raise InputError(422, f"Input validation error: `inputs` must have at most {self.max_length} tokens, "
                                      f"{name(i)} has {len(row)}. Send \"truncate\": true to cut it to the model's "
                                      f"maximum, or send less text.")
        return ids

    def submit(self, texts):
        """Queue `texts` (already through check_texts), truncated from the right; a Future of their
        logit rows, in order. Raises Overloaded when the queue is full."""
        return self.worker.submit([Text(text) for text in texts])

    def predict(self, texts):
        """Blocking: predictions for `texts`, in order."""
        return [to_prediction(softmax(row), self.labels) for row in self.submit(texts).result()]

    def close(self):
        """Finish what is queued, then stop the worker and the tokenizer thread."""
        self.worker.close()
        self.tokenizing.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
