"""What the benchmarks compute, by value: FLOPs per training row and the non-embedding parameter count."""

import math
import random

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


def soak_args(**overrides):
    from types import SimpleNamespace

    return SimpleNamespace(**{"check_from": 10_000, "check_to": 50_000, "window": 10_000, "sample_every": 1_000,
                              "max_growth": 0.05, **overrides})


def test_the_mixed_soak_explains_the_same_reviews_in_the_windows_it_compares():
    from bench.soak import EXPLAIN_EVERY, explain_cycle, make_requests

    short, long = [f"review {i}" for i in range(200)], ["a long review"]
    assert explain_cycle(soak_args()) == 10 and explain_cycle(soak_args(window=20_000)) == 20
    requests = make_requests("mixed", 50_000, short, long, seed=0, explain_cycle=10)
    explained = [r.texts[0] for r in requests if r.kind == "explain"]
    assert len(explained) == 50_000 // EXPLAIN_EVERY == 50
    assert len(set(explained)) == 10 and explained[:10] * 5 == explained  # ten reviews, round and round
    # the rest is drawn afresh: the windows 1-10,000 and 40,001-50,000 carry different requests
    rest = lambda begin: [r.body for r in requests[begin:begin + 10_000] if r.kind != "explain"]
    assert sum(a == b for a, b in zip(rest(0), rest(40_000))) < 2_000
    assert make_requests("mixed", 50_000, short, long, seed=0, explain_cycle=10) == requests  # the same for every server
    few = make_requests("mixed", 20_000, [f"review {i}" for i in range(3)], long, seed=0, explain_cycle=10)
    few_explained = [r.texts[0] for r in few if r.kind == "explain"]
    assert few_explained[:10] == few_explained[10:]  # three reviews, with repeats: still a cycle of ten
    # the single load draws nothing for explanations: its sequence is the one earlier soaks ran
    single = make_requests("single", 100, short, long, seed=0)
    rng = random.Random(0)
    assert [r.texts[0] for r in single[:3]] == [rng.choice(long) if rng.random() < 0.05 else rng.choice(short)
                                                for _ in range(3)]


def test_the_soak_refuses_windows_that_cannot_compare():
    from bench.soak import window_problem

    assert window_problem(soak_args()) is None
    assert window_problem(soak_args(window=20_000, check_from=20_000, check_to=60_000)) is None
    assert "multiple of --sample_every (1000) and of 1,000" in window_problem(soak_args(window=2_500))
    assert "multiple of --sample_every (2000)" in window_problem(soak_args(sample_every=2_000, window=3_000))
    assert "--sample_every must be a positive" in window_problem(soak_args(sample_every=0))
    assert "at least --window (20000)" in window_problem(soak_args(window=20_000))  # would take in the start
    assert "below --check_to" in window_problem(soak_args(check_to=10_000))
    assert "must be a multiple of --window" in window_problem(soak_args(check_to=45_000))


def test_the_soak_verdict_compares_medians_of_ten_turns():
    from types import SimpleNamespace

    from bench.soak import verdict, window_growth

    flat = [(0, 600)] + [(1000 * i, 1000 + (200 if i % 7 == 1 else 0)) for i in range(1, 51)]  # a 20% spike every 7th turn
    assert flat[50] == (50_000, 1200) and flat[10] == (10_000, 1000)  # one turn against one: +20%
    assert window_growth(flat, 10_000, 50_000, 10_000) == (1000, 1000, 0)  # the medians: 0
    server = SimpleNamespace(name="app", rss=flat, rss_end=[(done, mb - 300) for done, mb in flat], wrong=[])
    ok, line = verdict(server, soak_args())
    assert ok and line.startswith("PASS: app: median peak RSS per turn 1000 MB over requests 40,001-50,000, "
                                  "1000 MB over 1-10,000: +0.0%")
    growing = [(done, 1000 + done / 1000) for done, _ in flat]  # 1 MB per 1,000 requests: 1005.5 -> 1045.5
    server.rss = growing
    assert window_growth(growing, 10_000, 50_000, 10_000)[:2] == (1005.5, 1045.5)
    assert verdict(server, soak_args())[0]  # +4.0%
    assert not verdict(server, soak_args(max_growth=0.03))[0]
    server.rss, server.rss_end = flat, growing  # the peaks flat, the RSS left after each turn growing
    assert verdict(server, soak_args())[0] and not verdict(server, soak_args(max_growth=0.03))[0]
    server.rss_end, server.wrong = flat, ["request 12+: status 500"]
    assert verdict(server, soak_args())[1].startswith("FAIL")
    short_run = SimpleNamespace(name="app", rss=flat[:31], rss_end=flat[:31], wrong=[])
    ok, line = verdict(short_run, soak_args())
    assert not ok and "20,001-30,000" in line and line.endswith("(stopped at 30,000: too short to pass)")
    ok, line = verdict(SimpleNamespace(name="app", rss=flat[:15], rss_end=flat[:15], wrong=[]), soak_args())
    assert not ok and "stopped at 14,000 requests, too short to compare" in line
