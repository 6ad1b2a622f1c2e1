"""The server's memory stops growing (serve/memory.py, serve/packed.py, docs/serving.md#memory).

The regression test runs the live server (`python -m serve`, a subprocess) on a model as wide as
MiniLM (hidden 384, feed-forward 1536, 12 heads) but one layer deep, 64 tokens long and with a small
vocabulary, so that its activations are as large as the real model's and a few thousand requests
take seconds. It sends mixed-length texts at concurrency 16 and reads the server's RSS every 500
requests: after the warm-up the RSS must stay flat within a loose margin, packed and padded.
Batches with a new shape nearly every time and no malloc_trim (--pad_to_multiple_of 1
--malloc_trim_interval 0, what the server ran before) grow by tens of MB in the same run, which the last case shows, so the margin can catch the regression
without being a timed test.
"""

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import torch

from conftest import free_port
from model_utils import load_for_inference
from models import LABELS, ROOT, WORDPIECE_VOCAB, WORDS, save_tiny_bert
from serve.batching import Limits
from serve.classifier import Classifier, classify_by_length, padded_length
from serve.memory import Trimmer, allocator_name, batch_shapes, describe, glibc, log_setup, proc_status_mb
from serve.packed import classify_packed, padding_tokens, use_packed_attention

LIBJEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
REQUESTS, SAMPLE_EVERY, WARM_UP = 3000, 500, 1000  # RSS is read every 500 requests; flat after the first 1,000
# Texts of 1-80 words for a model of 64 tokens: a batch of 32 is as large as 8 texts of 256 tokens, and a
# bounded shape set small enough (95 shapes) that the warm-up meets nearly all of them.
MAX_LENGTH, MAX_WORDS = 64, 80


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """MiniLM's widths, one layer: its tensors are the real model's size, its forward pass 1/6 of the time."""
    return save_tiny_bert(tmp_path_factory.mktemp("wide") / "model", WORDPIECE_VOCAB, max_length=MAX_LENGTH, labels=LABELS,
                          initializer_range=0.3, hidden_size=384, intermediate_size=1536, num_attention_heads=12,
                          num_hidden_layers=1)


def start_server(model_dir, port, log_path, *flags):
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "serve", "--model_dir", str(model_dir), "--port", str(port),
                                "--max_concurrent_explains", "0", "--access_log", "false", *flags],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return process


async def soak(url, process, n, every, seed=0):
    """`n` requests at concurrency 16, texts of 1-MAX_WORDS words; the server's RSS every `every` requests
    (with nothing in flight), and the number of wrong answers."""
    rng = random.Random(seed)
    bodies = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, MAX_WORDS)))}) for _ in range(n)]
    rss, wrong = [], 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        deadline = time.monotonic() + 90
        while True:  # ready once /health says 200
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not become ready in 90 s"
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        async with session.get(url + "/info") as response:
            info = await response.json()

        async def one(body):
            nonlocal wrong
            async with session.post(url + "/predict", data=body, headers={"content-type": "application/json"}) as r:
                answer = await r.json()
                scores = answer["predictions"][0]["scores"] if r.status == 200 else {}
                wrong += not (r.status == 200 and set(scores) == set(LABELS) and abs(sum(scores.values()) - 1) < 1e-6)

        for start in range(0, n, every):
            chunk = iter(bodies[start:start + every])

            async def user():
                for body in chunk:
                    await one(body)

            await asyncio.gather(*(user() for _ in range(16)))
            rss.append(proc_status_mb(process.pid)["rss_mb"])
    return rss, wrong, info


def run_soak(model_dir, tmp_path, *flags):
    port = free_port()
    process = start_server(model_dir, port, tmp_path / "server.log", *flags)
    try:
        return asyncio.run(soak(f"http://127.0.0.1:{port}", process, REQUESTS, SAMPLE_EVERY))
    finally:
        process.terminate()
        process.wait(timeout=30)


def growth_after_warm_up(rss):
    """MB from the sample after the warm-up to the last one."""
    return rss[-1] - rss[WARM_UP // SAMPLE_EVERY - 1]


@pytest.mark.skipif(glibc() is None, reason="the growth is glibc's arenas'")
@pytest.mark.parametrize("packed", [True, False])
def test_rss_stays_flat_over_thousands_of_requests(wide_dir, tmp_path, packed):
    rss, wrong, info = run_soak(wide_dir, tmp_path, "--packed", str(packed).lower())
    assert wrong == 0
    assert info["packed"] is packed
    assert info["memory"]["batch_shapes"] == batch_shapes(64, 32, 64, packed) == 64 + 31
    # Loose: measured -1 to +17 MB (Python's caches, the tokenizer's, page-ins); the regression grows by 65-76.
    assert growth_after_warm_up(rss) < 30, f"RSS every {SAMPLE_EVERY} requests: {rss}"
    assert "batches of several texts are padded to a multiple of 64 tokens" in (tmp_path / "server.log").read_text()


@pytest.mark.skipif(glibc() is None, reason="the growth is glibc's arenas'")
def test_unbounded_shapes_grow_where_the_server_stays_flat(wide_dir, tmp_path):
    """The margin above can fail: the same soak with the server as it was before, a new shape for nearly
    every batch and no malloc_trim. (With the trim on, a trim just before the last sample can hide most of
    the growth: measured +17 and +25 MB where the trim-free server grew by 70.)"""
    rss, wrong, info = run_soak(wide_dir, tmp_path, "--pad_to_multiple_of", "1", "--malloc_trim_interval", "0")
    assert wrong == 0
    assert info["memory"]["batch_shapes"] == 64 + 31 * 64  # every count up to 32 texts of 64 tokens
    assert growth_after_warm_up(rss) > 45, f"RSS every {SAMPLE_EVERY} requests: {rss}"
    assert "may grow" in (tmp_path / "server.log").read_text()  # more shapes than oneDNN's cache of 1,024


# -----------------------------------------------------------------------------
# the bounded shapes, the flag, and what the server says


def test_packed_padding_bounds_the_shapes_and_leaves_the_logits(tiny_dir):
    totals = {n + padding_tokens(n, 64, 16) for n in range(1, 32 * 64 + 1)}  # every batch of up to 32 texts of 64
    assert totals == set(range(1, 65)) | set(range(80, 32 * 64 + 1, 16))
    assert len(totals) == batch_shapes(64, 32, 16) == 64 + 124
    uneven = {n + padding_tokens(n, 100, 64) for n in range(1, 2 * 100 + 1)}  # 64 does not divide 100: 128, 192, 256
    assert len(uneven) == batch_shapes(100, 2, 64) == 103
    assert padding_tokens(64, 64, 16) == 0 and padding_tokens(65, 64, 16) == 15  # within the maximum: never padded
    model, tokenizer = load_for_inference(str(tiny_dir))
    assert use_packed_attention(model)
    ids = tokenizer(["great film " * n for n in (9, 1, 30, 4, 2, 50, 1, 7)], truncation=True, max_length=64)["input_ids"]
    assert sum(map(len, ids)) == 186  # 48 does not divide it: the padding is real
    shapes = []
    model.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    torch.testing.assert_close(classify_packed(model, ids, max_length=64, multiple=48),
                               classify_packed(model, ids, max_length=64, multiple=1), rtol=0, atol=1e-5)
    assert shapes == [(1, 192), (1, 186)]
    # padding longer than the model's maximum comes in several "texts", each within its position table
    torch.testing.assert_close(classify_packed(model, ids, max_length=64, multiple=500),
                               classify_packed(model, ids, max_length=64, multiple=1), rtol=0, atol=1e-5)


def test_padded_rows_are_a_bounded_set_and_the_logits_do_not_change(tiny_dir):
    widths = {(texts, padded_length(texts, longest, 100, 16)) for texts in range(1, 33) for longest in range(1, 101)}
    assert len(widths) == batch_shapes(100, 32, 16, packed=False) == 100 + 31 * 7  # 16, 32, ..., 96 and 100
    assert (padded_length(1, 37, 100, 16), padded_length(2, 37, 100, 16), padded_length(2, 97, 100, 16)) == (37, 48, 100)
    model, tokenizer = load_for_inference(str(tiny_dir))
    ids = tokenizer(["great film " * n for n in (9, 1, 29, 4, 2, 6, 9)], truncation=True, max_length=64)["input_ids"]
    assert all(len(row) % 16 for row in ids)  # 20, 4, 60, 10, 6, 14 and 20 tokens: every chunk gets padding
    pad = tokenizer.pad_token_id
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    classify_by_length(model, ids, pad, 1_000_000, max_length=64, multiple=16)
    assert shapes == [(7, 64)]
    for cost in (1_000_000, 16):  # one chunk (padded to 64, not 60), and a few (the two of 20 tokens to 32)
        torch.testing.assert_close(classify_by_length(model, ids, pad, cost, max_length=64, multiple=16),
                                   classify_by_length(model, ids, pad, cost, max_length=64, multiple=1), rtol=0, atol=1e-5)


def test_the_server_pads_what_it_runs(tiny_dir):
    """The flag reaches the model: the shapes the worker's forward passes get, packed and padded."""
    short, long = ["great film " * 20, "dull " * 10], ["great film " * 20, "dull " * 10, "great " * 20]
    for packed in (True, False):
        with Classifier(str(tiny_dir), Limits(packed=packed, pad_to_multiple_of=64), "cpu") as classifier:
            shapes = []
            module = classifier.model.bert.embeddings if packed else classifier.model
            module.register_forward_pre_hook(
                lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
            lengths = [len(row) for row in classifier.encode(long)]
            assert lengths[0] > lengths[2] > lengths[1] and 64 < sum(lengths) < 128 and sum(lengths[:2]) <= 64
            classifier.predict(short)
            classifier.predict(long)
            if packed:  # within the model's maximum as they are; over it, rounded up to 128
                assert shapes == [(1, sum(lengths[:2])), (1, 128)]
            else:  # every row to the longest rounded up to 64 (one chunk: the split is not worth a pass here)
                assert shapes == [(2, 64), (3, 64)]


def test_the_flag_refuses_a_multiple_below_one(capsys):
    from serve.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", str(ROOT), "--pad_to_multiple_of", "0"])
    assert exit_info.value.code == 2
    assert "--pad_to_multiple_of must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", str(ROOT), "--malloc_trim_interval", "-1"])
    assert exit_info.value.code == 2
    assert "--malloc_trim_interval must be 0 (never) or a number of seconds, not -1.0" in capsys.readouterr().err
    assert Limits(pad_to_multiple_of=1).pad_to_multiple_of == 1


def fake_classifier(packed=True, device_type="cpu"):
    return SimpleNamespace(packed=packed, device_type=device_type, max_length=512, limits=Limits(), trimmer=Trimmer(10))


def test_describe_and_the_startup_line_say_whether_the_shapes_fit_onednns_cache(monkeypatch, caplog):
    info = describe(fake_classifier())
    assert info["batch_shapes"] == 760 and info["pad_to_multiple_of"] == 64
    assert describe(fake_classifier(packed=False))["batch_shapes"] == 512 + 31 * 8
    assert (info["onednn_primitive_cache_capacity"], info["onednn_primitive_cache_set_by"]) == (1024, "oneDNN's default")
    assert info["rss_mb"] > 0 and info["peak_rss_mb"] >= info["rss_mb"]
    assert describe(None)["batch_shapes"] is None and describe(fake_classifier(device_type="cuda"))["batch_shapes"] is None
    with caplog.at_level(logging.INFO, logger="memory"):
        log_setup(fake_classifier())
    assert "padded to a multiple of 64 tokens (packed, in all, over the model's maximum): at most 760 shapes, all in oneDNN's primitive cache of 1024" in caplog.text
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    caplog.clear()
    log_setup(fake_classifier())
    assert caplog.records[-1].levelname == "WARNING" and "may grow" in caplog.text
    assert describe(fake_classifier())["onednn_primitive_cache_set_by"] == "ONEDNN_PRIMITIVE_CACHE_CAPACITY in the environment"


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
def test_the_allocator_is_glibcs_unless_another_is_preloaded():
    assert allocator_name().startswith("glibc ")
    if not LIBJEMALLOC.exists():
        pytest.skip("libjemalloc2 is not installed")
    code = "from serve.memory import describe; print(describe()['allocator'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "LD_PRELOAD": str(LIBJEMALLOC)})
    assert done.stdout.strip() == f"jemalloc ({LIBJEMALLOC})"


TRIM_CODE = """
import ctypes, json, time
from serve.memory import Trimmer, proc_status_mb
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(3000)]  # under the mmap threshold: from the heap
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)  # touched: resident
for i, block in enumerate(blocks):
    if i % 10:  # every 10th stays, so the heap's top cannot shrink: the free pages are inside it
        libc.free(block)
freed = proc_status_mb()["rss_mb"]
trimmer = Trimmer(0.01)
trimmer()  # too soon: nothing
soon = proc_status_mb()["rss_mb"]
time.sleep(0.02)
trimmer()
print(json.dumps({"freed": freed, "soon": soon, "trimmed": proc_status_mb()["rss_mb"], "trims": trimmer.trims}))
"""


@pytest.mark.skipif(glibc() is None, reason="malloc_trim is glibc's")
def test_the_trimmer_hands_freed_pages_back_at_most_once_an_interval():
    done = subprocess.run([sys.executable, "-c", TRIM_CODE], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    rss = json.loads(done.stdout)
    assert rss["trims"] == 1
    assert rss["freed"] - rss["soon"] < 5  # freed but kept: 170 MB of the 190 touched stay resident
    assert rss["freed"] - rss["trimmed"] > 120, rss  # handed back
    assert Trimmer(0).enabled is False
