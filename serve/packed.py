"""Packed batches: a BERT batch with no padded rows, for serving on a CPU.

A padded batch of texts of 30 and 120 tokens computes 120 rows for each. Packing lays the texts'
tokens end to end as one sequence of exactly the real tokens instead. Everything in a BERT layer
but attention works on each token alone (the Q/K/V, output and feed-forward matrices, LayerNorm),
so those matmuls, most of the work, run once on one tall matrix with no wasted rows. Attention
must not mix texts: `packed_sdpa` runs it text by text, between the offsets in `cu_seq_lens_q`
(the name flash-attention's variable-length kernels use; TEI packs BERT batches with those on GPUs).
A batch over the model's maximum ends with a few [PAD] tokens of its own, so that the token counts
are a bounded set (--pad_to_multiple_of; why the server's memory needs that: docs/serving.md#memory).

    if can_pack(model) and use_packed_attention(model):
        logits = classify_packed(model, ids)   # ids: token ids per text, truncated; (len(ids), num_labels)
"""

from itertools import accumulate, chain, pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def can_pack(model):
    """Packing needs to know the model's layout: BERT's embeddings, encoder, pooler and classifier,
    with bidirectional attention (a BERT configured as a decoder attends causally)."""
    return type(model) is BertForSequenceClassification and not model.config.is_decoder


def use_packed_attention(model):
    """Route the model's attention layers to packed_sdpa; False where transformers cannot (it then
    only logs a warning, e.g. when it cannot read the model's source), so the caller must check.

    The function is registered by name, like "sdpa", when packing is switched on (not at import):
    set_attn_implementation then routes every attention layer here. Padded batches build their
    mask as for "sdpa"."""
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION


def padding_tokens(total, max_length, multiple=1):
    """[PAD] tokens to add to a packed batch of `total` tokens: none up to the model's maximum (a
    batch of one text, at most max_length shapes), else up to the next multiple of `multiple`."""
    return 0 if total <= max_length else -total % multiple


@torch.inference_mode()
def classify_packed(model, ids, max_length=512, multiple=1):
    """Logits (len(ids), num_labels) in float32, in input order, from one forward pass with no padding.

    `ids`: each text's token ids, special tokens included, already truncated to the model's maximum.
    The model must use PACKED_ATTENTION. This is BertForSequenceClassification.forward, taken apart
    where it assumes one text per row: positions restart at 0 for each text, and the pooler reads
    each text's [CLS] token, not the first row's.

    A batch of more than `max_length` tokens is rounded up to a multiple of `multiple` by one more
    "text" of [PAD] tokens, which attends only to itself and whose output is dropped: the texts' logits
    do not change, and the pass has one of a bounded set of shapes (serve/memory.py: why).
    """
    lengths = [len(row) for row in ids]
    pad = padding_tokens(sum(lengths), max_length, multiple)
    # The padding's "texts", none longer than the model's maximum (positions must stay in its table).
    segments = lengths + [max_length] * (pad // max_length) + ([pad % max_length] if pad % max_length else [])
    device = model.device
    tokens = list(chain.from_iterable(ids)) + [model.config.pad_token_id or 0] * pad
    input_ids = torch.tensor(tokens, device=device)[None]  # (1, total tokens)
    position_ids = torch.cat([torch.arange(n) for n in segments])[None].to(device)
    starts = torch.tensor([0, *accumulate(segments)], device=device)  # text i is tokens starts[i]:starts[i + 1]
    bert = model.bert
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids)  # token types: all 0, one text each
    hidden = bert.encoder(hidden, cu_seq_lens_q=starts, cu_seq_lens_k=starts).last_hidden_state
    cls = hidden[0, starts[:len(ids)]]  # (texts, hidden): each text's first token, [CLS]
    pooled = bert.pooler(cls[:, None])  # the pooler takes position 0 of a (texts, 1, hidden) batch
    return model.classifier(model.dropout(pooled)).float()
