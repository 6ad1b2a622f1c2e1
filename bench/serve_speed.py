"""Serving benchmark: our batching app vs a baseline server that calls pipeline() once per request.

    python -m bench.serve_speed                    # minilm-l6 + a 2-label head, 400 requests at concurrency 1 and 16
    python -m bench.serve_speed --model_dir ./fine-tuned-bert --requests 1000 --concurrency 1 4 16 32
    python -m bench.serve_speed --compare_dir /tmp/before   # and the app of another checkout, side by side

Each server runs in its own process under the same uvicorn settings (one worker, no access log);
they take turns, in --rounds alternating rounds, so that load from other jobs on a shared machine
hits both alike; this process is the client (aiohttp, asyncio). Every request carries one real
IMDb test review of at most --max_tokens tokens (short reviews, so a run takes a minute or two),
the same reviews in the same order for both servers. Prints req/s and latency percentiles; the
numbers go into BENCHMARKS.md ("## Serving") by hand, with the command, date and machine.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]  # the repository root: servers run from there
sys.path.insert(0, str(ROOT / "tests"))
from models import IMDB_TEST, save_minilm_classifier  # noqa: E402 (the tests' ../shared paths and served model)

PROG = "python -m bench.serve_speed"


# -----------------------------------------------------------------------------
# the baseline: what one writes first, pipeline() once per request


def create_baseline_app():
    """uvicorn bench.serve_speed:create_baseline_app --factory, with BENCH_MODEL_DIR set."""
    from fastapi import FastAPI
    from transformers import pipeline

    pipe = pipeline("text-classification", model=os.environ["BENCH_MODEL_DIR"], top_k=None, truncation=True)
    lock = threading.Lock()  # one pipeline call at a time: see docs/serving.md on why not threads
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict):  # FastAPI runs a plain `def` in its thread pool
        with lock:
            out = pipe([body["text"]])[0]  # [{"label", "score"} per class]
        best = max(out, key=lambda r: r["score"])
        return {"predictions": [{"label": best["label"], "score": best["score"],
                                 "scores": {r["label"]: r["score"] for r in out}}]}

    return app


# -----------------------------------------------------------------------------
# data and servers


def short_reviews(model_dir, max_tokens, n, seed=0):
    """`n` IMDb test reviews of at most `max_tokens` tokens, shuffled (mixed lengths in every batch)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = pd.read_parquet(IMDB_TEST)["text"].tolist()
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]  # untruncated
    short = [text for text, length in zip(texts, lengths) if length <= max_tokens]
    random.Random(seed).shuffle(short)
    assert len(short) >= n, f"only {len(short)} reviews have <= {max_tokens} tokens"
    return short[:n], sorted(lengths[texts.index(t)] for t in short[:n])


def start_server(app_env, model_dir, port, root=ROOT):
    """The app with `app_env` added to its environment, or the baseline when `app_env` is None;
    run from `root`, whose serve/ package it imports (another checkout, for --compare_dir)."""
    target = ["bench.serve_speed:create_baseline_app" if app_env is None else "serve.app:app_from_env", "--factory"]
    # SERVE_ACCESS_LOG=false: no line per request from the app either, as --no-access-log for uvicorn's own.
    env = {**os.environ, "SERVE_MODEL_DIR": str(model_dir), "BENCH_MODEL_DIR": str(model_dir),
           "SERVE_ACCESS_LOG": "false", **(app_env or {})}
    cmd = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port),
           "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=root, env=env)


def wait_healthy(url, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with code {process.returncode}")
        try:
            get_json(url + "/health")
            return
        except OSError:  # not listening yet (URLError), or 503 while the model loads (HTTPError)
            time.sleep(0.3)
    raise SystemExit(f"server at {url} not healthy after {timeout} s")


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


# -----------------------------------------------------------------------------
# the client


async def load_test(url, texts, concurrency, client="aiohttp"):
    """Send every text as its own request, `concurrency` in flight at a time (closed loop: each
    simulated user sends its next request when the previous answer arrives)."""
    latencies, errors, next_index = [], 0, 0
    post = {"aiohttp": post_aiohttp, "httpx": post_httpx}[client]

    async def user(session):
        nonlocal errors, next_index
        while next_index < len(texts):
            text = texts[next_index]
            next_index += 1  # no await in between: asyncio runs one user at a time
            started = time.perf_counter()
            ok = await post(session, url + "/predict", {"text": text})
            latencies.append(time.perf_counter() - started)
            errors += not ok

    async with open_session(client, concurrency) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return elapsed, sorted(latencies), errors, cpu


def open_session(client, concurrency):
    """One pooled session, `concurrency` keep-alive connections. This client shares the two cores
    with the server it measures, so its own cost matters: per request, aiohttp used 0.4 ms of CPU
    here and httpx 3.9 ms (BENCHMARKS.md), which slows the server's torch threads when they are busy."""
    if client == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=120)


async def post_aiohttp(session, url, body):
    """True for a 200 answer holding one prediction; False for any other answer or a failed connection."""
    try:
        async with session.post(url, json=body) as response:
            return response.status == 200 and len((await response.json())["predictions"]) == 1
    except (aiohttp.ClientError, TimeoutError):  # the 120 s total timeout raises TimeoutError
        return False


async def post_httpx(session, url, body):
    try:
        response = await session.post(url, json=body)
        return response.status_code == 200 and len(response.json()["predictions"]) == 1
    except httpx.HTTPError:
        return False


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def server_kinds(app_env, compare_envs, compare_dir=None):
    """Server name -> (the app's extra environment, the folder it runs from); an environment of None
    is the baseline. Each of `compare_envs` adds an app, so that a setting is measured against the default
    in the same run; `compare_dir` the app of another checkout (the code before a change, say)."""
    kinds = {"baseline": (None, ROOT), "app": (app_env, ROOT)}
    for compare_env in compare_envs:
        kinds["app " + " ".join(f"{k}={v}" for k, v in compare_env.items())] = ({**app_env, **compare_env}, ROOT)
    if compare_dir:
        kinds[f"app in {compare_dir}"] = (app_env, Path(compare_dir).resolve())
    return kinds


def bench(model_dir, port, texts, concurrencies, rounds, kinds, clients):
    """Every server up at once (an idle one costs no CPU), measured in alternating rounds, so a
    background job on a shared machine slows all alike instead of skewing one side."""
    urls = {kind: f"http://127.0.0.1:{port + i}" for i, kind in enumerate(kinds)}
    processes = {kind: start_server(env, model_dir, port + i, root)
                 for i, (kind, (env, root)) in enumerate(kinds.items())}
    rows = []
    try:
        for kind in kinds:
            wait_healthy(urls[kind], processes[kind])
            asyncio.run(load_test(urls[kind], texts[:32], max(concurrencies)))  # warm-up, not measured
        for concurrency in concurrencies:
            for client in clients:
                rows += measure(urls, texts, concurrency, rounds, client)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)
    return rows


def measure(urls, texts, concurrency, rounds, client):
    """One table row per server: `texts` split over `rounds`, the servers taking turns."""
    kinds = list(urls)
    apps = kinds[1:]
    totals = {kind: {"seconds": 0.0, "latencies": [], "errors": 0, "client_cpu": 0.0, "rounds": []} for kind in kinds}
    batches_before = {app: get_json(urls[app] + "/info")["batches_run"] for app in apps}
    for r in range(rounds):
        chunk = texts[r::rounds]
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            elapsed, latencies, errors, cpu = asyncio.run(load_test(urls[kind], chunk, concurrency, client))
            totals[kind]["rounds"].append(len(chunk) / elapsed)
            totals[kind]["seconds"] += elapsed
            totals[kind]["client_cpu"] += cpu
            totals[kind]["latencies"] += latencies
            totals[kind]["errors"] += errors
    for app in apps:
        batches = get_json(urls[app] + "/info")["batches_run"] - batches_before[app]
        print(f"  concurrency {concurrency}, {client}: {app} ran {len(texts)} texts in {batches} batches "
              f"({len(texts) / batches:.1f} per batch); / baseline by round: "
              f"{ratio_by_round(totals[app], totals['baseline'])}", flush=True)
    for app in apps[1:]:
        print(f"  concurrency {concurrency}, {client}: {app} / app by round: "
              f"{ratio_by_round(totals[app], totals['app'])}", flush=True)
    rows = []
    for kind in kinds:
        t = totals[kind]
        latencies = sorted(t["latencies"])
        rows.append({
            "server": kind, "client": client, "concurrency": concurrency, "requests": len(latencies),
            "errors": t["errors"], "seconds": t["seconds"], "req_per_s": len(latencies) / t["seconds"],
            **{f"p{q}_ms": 1000 * percentile(latencies, q) for q in (50, 95, 99)},
            "client_cpu_ms": 1000 * t["client_cpu"] / len(latencies),
        })
        print(format_row(rows[-1]), flush=True)
    return rows


def ratio_by_round(a, b):
    """A round's runs are back to back, so their ratio cancels slow drifts of a shared machine."""
    ratios = sorted(x / y for x, y in zip(a["rounds"], b["rounds"]))
    return f"median {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"


# -----------------------------------------------------------------------------
# report


HEADER = ("| server | client | concurrency | requests | errors | seconds | req/s | p50 ms | p95 ms | p99 ms "
          "| client CPU ms/req |")


def format_row(r):
    return (f"| {r['server']} | {r['client']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
            f"{r['seconds']:.1f} | {r['req_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['client_cpu_ms']:.2f} |")


def print_summary(rows):
    print("\n" + HEADER + "\n" + "|---" * (HEADER.count("|") - 1) + "|")
    for r in rows:
        print(format_row(r))
    by = {(r["server"], r["client"], r["concurrency"]): r for r in rows}
    for (server, client, concurrency), r in by.items():
        base = by[("baseline", client, concurrency)]
        if server != "baseline":
            print(f"concurrency {concurrency}, {client}: {server} / baseline throughput = "
                  f"{r['req_per_s'] / base['req_per_s']:.2f}x")


def parse_args():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="a save_pretrained folder; default: minilm-l6 + a seeded 2-label head")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max_tokens", type=int, default=128, help="only reviews this short (tokens, specials included)")
    parser.add_argument("--rounds", type=int, default=4, help="alternate the servers this many times per concurrency")
    parser.add_argument("--port", type=int, default=8765, help="the baseline's port; the apps get the next ones")
    parser.add_argument("--client", nargs="+", choices=["aiohttp", "httpx"], default=["aiohttp"],
                        help="the load generator; several are measured one after the other")
    parser.add_argument("--max_wait_ms", help="passed to the app as SERVE_MAX_WAIT_MS")
    parser.add_argument("--app_env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more environment for the app only, e.g. SERVE_FORWARD_COST_TOKENS=64 OMP_NUM_THREADS=1")
    parser.add_argument("--compare_env", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="also measure another app with this environment, e.g. SERVE_PACKED=false; repeat the flag "
                             "for several, each measured in the same rounds")
    parser.add_argument("--compare_dir", help="also measure the app of another checkout of this repository, "
                                              "run from that folder (e.g. the code before a change)")
    args = parser.parse_args()
    args.app_env = parse_env(parser, "app_env", args.app_env)
    args.compare_env = [parse_env(parser, "compare_env", pairs) for pairs in args.compare_env]
    if args.max_wait_ms:
        args.app_env["SERVE_MAX_WAIT_MS"] = args.max_wait_ms
    return args


def parse_env(parser, name, pairs):
    if any("=" not in pair for pair in pairs):
        parser.error(f"--{name} takes KEY=VALUE pairs, got {pairs}")
    return dict(pair.split("=", 1) for pair in pairs)


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = save_minilm_classifier(Path(tmp) / "minilm-l6-2labels")
        texts, lengths = short_reviews(model_dir, args.max_tokens, args.requests)
        print(f"{len(texts)} IMDb test reviews, {lengths[0]}-{lengths[-1]} tokens "
              f"(median {lengths[len(lengths) // 2]}); model {model_dir}")
        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
              f"python {platform.python_version()}")
        print(HEADER)
        kinds = server_kinds(args.app_env, args.compare_env, args.compare_dir)
        rows = bench(model_dir, args.port, texts, args.concurrency, args.rounds, kinds, args.client)
        print_summary(rows)


if __name__ == "__main__":
    main()
