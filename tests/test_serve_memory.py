"""The server's memory stops growing (serve/memory.py, docs/serving.md#memory).

The regression test runs the live server (`python -m serve`, a subprocess) on a model as wide as
MiniLM (hidden 384, feed-forward 1536, 12 heads) but one layer deep and with a small vocabulary, so
that its activations are as large as the real model's and a few thousand requests take seconds.
It sends mixed-length texts at concurrency 16 and reads the server's RSS every 500 requests: after
the warm-up the RSS must stay flat within a loose margin. glibc's dynamic mmap threshold (what the
server ran before, --malloc_mmap_threshold 0) grows by tens of MB in the same run, which the second
case shows, so the margin can catch the regression without being a timed test.
"""

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import free_port
from models import LABELS, ROOT, WORDPIECE_VOCAB, WORDS, save_tiny_bert
from serve.memory import GLIBC_MMAP_THRESHOLD_MAX, allocator_name, check_mmap_threshold, describe, glibc, proc_status_mb

LIBJEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
REQUESTS, SAMPLE_EVERY, WARM_UP = 3000, 500, 1000  # RSS is read every 500 requests; flat after the first 1,000


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """MiniLM's widths, one layer: its tensors are the real model's size, its forward pass 1/6 of the time."""
    return save_tiny_bert(tmp_path_factory.mktemp("wide") / "model", WORDPIECE_VOCAB, max_length=256, labels=LABELS,
                          initializer_range=0.3, hidden_size=384, intermediate_size=1536, num_attention_heads=12,
                          num_hidden_layers=1)


def start_server(model_dir, port, log_path, *flags):
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "serve", "--model_dir", str(model_dir), "--port", str(port),
                                "--max_concurrent_explains", "0", "--access_log", "false", *flags],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return process


async def soak(url, process, n, every, seed=0):
    """`n` requests at concurrency 16, texts of 1-200 words; the server's RSS every `every` requests
    (with nothing in flight), and the number of wrong answers."""
    rng = random.Random(seed)
    bodies = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 200)))}) for _ in range(n)]
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


@pytest.mark.skipif(glibc() is None, reason="the setting and the growth it prevents are glibc's")
def test_rss_stays_flat_over_thousands_of_requests(wide_dir, tmp_path):
    rss, wrong, info = run_soak(wide_dir, tmp_path)
    assert wrong == 0
    assert info["memory"]["mmap_threshold"] == 128 * 1024
    assert info["memory"]["mmap_threshold_set_by"].startswith("held fixed by the server")
    # Loose: a few MB of noise (Python's caches, the tokenizer's, page-ins); the regression grows by tens.
    assert growth_after_warm_up(rss) < 15, f"RSS every {SAMPLE_EVERY} requests: {rss}"
    assert "mmap threshold held fixed" in (tmp_path / "server.log").read_text()


@pytest.mark.skipif(glibc() is None, reason="the setting and the growth it prevents are glibc's")
def test_glibcs_dynamic_threshold_grows_where_the_server_stays_flat(wide_dir, tmp_path):
    """The margin above can fail: the same soak under glibc's dynamic threshold, as the server ran before."""
    rss, wrong, info = run_soak(wide_dir, tmp_path, "--malloc_mmap_threshold", "0")
    assert wrong == 0
    assert info["memory"]["mmap_threshold"] is None
    assert growth_after_warm_up(rss) > 30, f"RSS every {SAMPLE_EVERY} requests: {rss}"
    assert "memory grows" in (tmp_path / "server.log").read_text()


# -----------------------------------------------------------------------------
# the setting, the flag, and what the server says


@pytest.mark.parametrize("value", [-1, GLIBC_MMAP_THRESHOLD_MAX + 1])
def test_the_flag_refuses_what_mallopt_would(value, capsys):
    from serve.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model_dir", str(ROOT), "--malloc_mmap_threshold", str(value)])
    assert exit_info.value.code == 2
    assert "--malloc_mmap_threshold must be 0" in capsys.readouterr().err
    check_mmap_threshold(0)
    check_mmap_threshold(GLIBC_MMAP_THRESHOLD_MAX)


@pytest.mark.skipif(glibc() is None, reason="glibc's malloc")
def test_describe_says_who_set_the_threshold(monkeypatch):
    assert allocator_name().startswith("glibc ")
    assert describe(131072)["mmap_threshold"] == 131072
    assert describe(0)["mmap_threshold"] is None
    assert describe(0)["rss_mb"] > 0
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert describe(131072)["mmap_threshold"] == 65536
    assert describe(131072)["mmap_threshold_set_by"] == "MALLOC_MMAP_THRESHOLD_ in the environment"


@pytest.mark.skipif(not LIBJEMALLOC.exists(), reason="libjemalloc2 is not installed")
def test_a_preloaded_malloc_is_named_and_left_alone():
    code = ("import logging; logging.basicConfig(level=logging.INFO); from serve import memory; "
            "memory.configure(131072); print(memory.describe(131072)['allocator'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "LD_PRELOAD": str(LIBJEMALLOC)})
    assert done.stdout.strip() == f"jemalloc ({LIBJEMALLOC})"
    assert "answers malloc; --malloc_mmap_threshold is glibc's, not applied" in done.stderr
