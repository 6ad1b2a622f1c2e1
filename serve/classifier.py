"""A trained model folder behind the batching worker: what the web app and the command line serve.

    classifier = Classifier("fine-tuned-bert", Limits(), device="cpu")
    classifier.predict(["A wonderful film."])   # [{"label": "pos", "score": 0.97, "scores": {...}}]

How a batch runs: on a CPU a BERT batch is packed, with no padding at all (serve/packed.py);
elsewhere it is padded, and split by length where that saves time (`classify_by_length`).
"""

import math
from functools import partial

import torch

from model_utils import (classify_encoded, count_parameters, device_name, label_names, load_for_inference,
                         model_max_length)
from serve.batching import BatchWorker
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


def classify_by_length(model, tokenizer, texts, max_length, forward_cost_tokens):
    """Probabilities (len(texts), num_labels) in input order, computed in chunks of similar length.

    A padded batch costs about (texts x longest text) tokens. Gathered requests have mixed lengths
    (25 to 128 tokens, say), so one batch would spend a third of its time on padding; sorting and
    cutting it where that saves more than a forward pass costs gets most of that back on a CPU.
    The texts are tokenized once; each chunk is padded from those ids.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    probs = torch.empty(len(texts), model.config.num_labels)
    for start, end in split_by_length([lengths[i] for i in order], forward_cost_tokens):
        rows = order[start:end]
        chunk = {key: [encoded[key][i] for i in rows] for key in encoded.keys()}
        probs[rows] = classify_encoded(model, tokenizer, chunk).cpu()
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
        model, tokenizer = load_for_inference(model_dir, device, DTYPES[limits.dtype or default_dtype(device)])
        self.model_dir = model_dir
        self.dtype = str(model.dtype).removeprefix("torch.")  # as loaded: what /info reports
        self.device_name = device_name(model.device)
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
        """Finish what is queued, then stop the worker."""
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
