"""What the benchmarks compute, by value: FLOPs per training row and the non-embedding parameter count."""

import math

import torch
from transformers import BertForSequenceClassification

from bench.measure import matmul_peak, training_flops
from model_utils import count_parameters
from models import tiny_bert_config


def test_training_flops_by_hand():
    config = tiny_bert_config()  # hidden 32, 2 layers
    # 6 * N * T for the weight matmuls, forward and backward; 12 * L * d * T^2 for QK^T and AV
    assert training_flops(10, config, 1_000) == 6 * 1_000 * 10 + 12 * 2 * 32 * 10**2 == 136_800
    assert training_flops(torch.tensor([10, 20]), config, 1_000).tolist() == [136_800, 6 * 1_000 * 20 + 12 * 2 * 32 * 400]


def test_nonembedding_count_leaves_out_the_three_tables_only():
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=100, max_position_embeddings=64))
    word, position, token_type = 100 * 32, 64 * 32, 2 * 32
    assert count_parameters(model) - count_parameters(model, embeddings=False) == word + position + token_type
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_matmul_peak_is_flops_over_time():
    """Bounded by what the machine can do: a small matmul on this CPU is between 0.1 and 10,000 GFLOP/s."""
    peak = matmul_peak(size=128, seconds=0.05, trials=2)
    assert math.isfinite(peak) and 1e8 < peak < 1e13
