"""Soak benchmark: does the live server's memory stop growing? N requests against `python -m serve`,
its resident memory (RSS) read every 1,000 requests.

    python -m bench.soak                                   # minilm-l6 + a 2-label head: 50,000 requests of each load
    python -m bench.soak --load mixed --requests 20000     # one load, shorter
    python -m bench.soak --server app --server unbounded SERVE_PAD_TO_MULTIPLE_OF=1 \
                         --server jemalloc SERVE_PAD_TO_MULTIPLE_OF=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
                                                           # candidates side by side, in turns of 1,000 requests
    python -m bench.soak --compare_dir /tmp/before --compare_requests 20000
                                                           # and the app of another checkout (the code before a fix)
    python -m bench.soak --probe --server before SERVE_PAD_TO_MULTIPLE_OF=1 --requests 3000
                                                           # where the memory goes (bench/memory_probe.py)
    python -m bench.soak --train_steps 20000               # training instead: train_loop.py's RSS every 1,000 steps

Two loads, each at --concurrency simulated users (closed loop: a user sends its next request when
its answer arrives), all to 127.0.0.1:
- single: one IMDb test review per POST /predict {"text"}, as in bench/serve_speed.py;
- mixed: what a server sees in a day: single texts (55%), our {"texts"} batches of 2-8 (10%), TEI's
  {"inputs"} alone (10%) and in batches of 2-16 (10%), the Hub's POST / (10%), bad bodies (5%: not
  JSON, an empty text, 33 texts, a pair, an unknown field), and one POST /explain per 1,000 requests,
  of a few short reviews in turn (one per 1,000 requests of --window: by default ten, the same ten in
  every window).
Reviews come from a pool of --pool IMDb test reviews of at most --max_tokens tokens, and 5% from the
longest ones (truncated to 512 tokens by the server), in a sequence fixed by --seed, the same for
every server. Every answer is checked: its status, its shape, and its probabilities against
model_utils.classify, the training code's own path (1e-4); bad bodies get their documented 4xx.

Each server is its own process, started as a user starts it (`python -m serve`, or with --launch
uvicorn `uvicorn serve.app:app_from_env --factory`), with what --server adds to its environment
(SERVE_<FLAG> variables become flags of python -m serve, as the uvicorn factory reads them).
Several servers take turns of --sample_every requests each, so they see the same requests under the
same machine load; each one's peak RSS during each of its turns is read at the turn's end
(/proc/<pid>/status's VmHWM, reset before the turn: reset_peak_rss), and its RSS at that moment.
Prints a table (requests vs peak RSS per server), writes a PNG of the same into --out, and one pass
line per server and load: over the turns of the last --window requests up to --check_to (by default
40,001 to 50,000), the median peak RSS within --max_growth of its median over those up to --check_from
(1 to 10,000), the median RSS at the turns' end likewise, and every answer right. A median of ten
turns, not one turn against one: a turn's peak swings by 10-20% with what coincides in it. Exit code 1
if a server of this checkout fails that (the --compare_dir one is reported only).
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from models import IMDB_TEST, save_minilm_classifier  # noqa: E402 (the tests' ../shared paths and served model)
from serve.memory import proc_status_mb  # noqa: E402

PROG = "python -m bench.soak"
TOLERANCE = 1e-4  # probabilities: packed batches against padded ones differ by ~1e-6
EXPLAIN_EVERY = 1000
BAD_BODIES = [  # (body bytes, the status and error type the server must answer)
    (b'{"text": "unterminated', 422, "Validation"),
    (b'{"text": ""}', 422, "Validation"),
    (json.dumps({"texts": ["Fine."] * 33}).encode(), 413, "Validation"),
    (b'{"inputs": ["a pair", "of texts"]}', 422, "Validation"),
    (b'{"inputs": ""}', 400, "Empty"),
    (b'{"review": "Great!"}', 422, "Validation"),
]


# -----------------------------------------------------------------------------
# the reviews and what the model says about them


def review_pool(model_dir, n, max_tokens, n_long, seed, cache_dir):
    """(short reviews, long reviews, reference probabilities, id2label): `n` IMDb test reviews of at
    most `max_tokens` tokens and the `n_long` longest (all truncated to the model's maximum). The
    reference takes minutes on 2 cores: it is kept in `cache_dir`, for the same model files and pool."""
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime) for f in Path(model_dir).glob("*.safetensors"))
    key = json.dumps([str(Path(model_dir).resolve()), weights, n, max_tokens, n_long, seed])
    cache = Path(cache_dir) / "reference.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return (cached["short"], cached["long"], cached["reference"],
                    {int(i): name for i, name in cached["id2label"].items()})
    short, long, reference, id2label = compute_pool(model_dir, n, max_tokens, n_long, seed)
    cache.write_text(json.dumps({"key": key, "short": short, "long": long, "reference": reference,
                                 "id2label": id2label}))
    return short, long, reference, id2label


def compute_pool(model_dir, n, max_tokens, n_long, seed):
    import torch
    from model_utils import classify, load_for_inference

    model, tokenizer = load_for_inference(model_dir)
    texts = pd.read_parquet(IMDB_TEST)["text"].tolist()
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    short = [t for t, n_tokens in zip(texts, lengths) if n_tokens <= max_tokens]
    random.Random(seed).shuffle(short)
    long = [t for _, t in sorted(zip(lengths, texts), reverse=True)[:n_long]]
    pool = short[:n] + long
    reference = {}
    torch.set_num_threads(os.cpu_count())
    by_length = sorted(pool, key=len)
    for start in range(0, len(by_length), 16):  # similar lengths together: little padding
        chunk = by_length[start:start + 16]
        for text, probs in zip(chunk, classify(model, tokenizer, chunk).tolist()):
            reference[text] = probs
    return short[:n], long, reference, model.config.id2label


# -----------------------------------------------------------------------------
# the requests of each load, and how their answers are checked


@dataclass
class Request:
    kind: str  # what it is, for the error report
    path: str
    body: bytes
    texts: list = field(default_factory=list)  # the reviews it carries, in order
    status: int = 200
    error_type: str = None


def make_requests(load, n, short, long, seed, explain_cycle=10):
    """The load's first `n` requests, fixed by `seed`: every server gets the same sequence.

    The mixed load explains `explain_cycle` reviews in turn, one per EXPLAIN_EVERY requests, round and
    round; everything else is drawn afresh. An explanation is the largest allocation a turn makes, and it
    grows with the review's length (MiniLM: the server's RSS, read every 20 ms, rose from about 900 to
    1,300 MB during one), so the windows the pass line compares must explain the same reviews, or it
    compares review lengths instead of the server's memory."""
    rng = random.Random(seed)
    if load == "mixed":  # drawn first, and only here: the single load's sequence stays what it was
        explainable = [t for t in short if len(t) <= 300] or short  # short reviews: an explanation takes ~1 s
        explained = (rng.sample(explainable, explain_cycle) if len(explainable) >= explain_cycle
                     else rng.choices(explainable, k=explain_cycle))  # a short pool: with repeats, still a cycle

    def review():
        return rng.choice(long) if rng.random() < 0.05 else rng.choice(short)

    def dump(obj):
        return json.dumps(obj).encode()

    requests = []
    for i in range(n):
        if load == "single":
            text = review()
            requests.append(Request("text", "/predict", dump({"text": text}), [text]))
            continue
        if i % EXPLAIN_EVERY == EXPLAIN_EVERY // 2:
            text = explained[i // EXPLAIN_EVERY % len(explained)]
            requests.append(Request("explain", "/explain", dump({"text": text}), [text]))
            continue
        u = rng.random()
        if u < 0.55:
            text = review()
            requests.append(Request("text", "/predict", dump({"text": text}), [text]))
        elif u < 0.65:
            texts = [review() for _ in range(rng.randint(2, 8))]
            requests.append(Request("texts", "/predict", dump({"texts": texts}), texts))
        elif u < 0.75:
            text = review()
            requests.append(Request("tei", "/predict", dump({"inputs": text}), [text]))
        elif u < 0.85:
            texts = [review() for _ in range(rng.randint(2, 16))]
            requests.append(Request("tei_batch", "/predict", dump({"inputs": [[t] for t in texts]}), texts))
        elif u < 0.95:
            text = review()
            requests.append(Request("hub", "/", dump({"inputs": text, "parameters": {"top_k": 1}}), [text]))
        else:
            body, status, error_type = rng.choice(BAD_BODIES)
            requests.append(Request("bad", "/predict", body, [], status, error_type))
    return requests


def close(probs, expected):
    return len(probs) == len(expected) and all(abs(a - b) <= TOLERANCE for a, b in zip(probs, expected))


def check_answer(request, status, answer, reference, labels):
    """None if the answer is right, else what is wrong with it (one line)."""
    if request.kind == "explain" and status == 429:  # one explanation at a time: a documented answer
        return None if answer.get("error_type") == "Overloaded" else f"429 without error_type Overloaded: {answer}"
    if status != request.status:
        return f"status {status}, expected {request.status}: {str(answer)[:200]}"
    if request.status != 200:
        return None if answer.get("error_type") == request.error_type else f"error_type {answer.get('error_type')}"
    expected = [reference[text] for text in request.texts]
    if request.kind in ("text", "texts"):
        got = [[p["scores"][name] for name in labels] for p in answer["predictions"]]
    elif request.kind == "tei":
        got = [scores_by_label(answer, labels)]
    elif request.kind == "tei_batch":
        got = [scores_by_label(row, labels) for row in answer]
    elif request.kind == "hub":  # top_k 1: the best label and its probability
        best = max(range(len(labels)), key=expected[0].__getitem__)
        ok = len(answer) == 1 and answer[0][0]["label"] == labels[best]
        return None if ok and abs(answer[0][0]["score"] - expected[0][best]) <= TOLERANCE else f"hub answer {answer}"
    elif request.kind == "explain":
        got = [[answer["prediction"]["scores"][name] for name in labels]]
        if not answer["words"]:
            return "an explanation with no words"
    if len(got) != len(expected) or not all(close(g, e) for g, e in zip(got, expected)):
        return f"{request.kind}: scores {got[:2]} ..., expected {expected[:2]} ..."
    return None


def scores_by_label(ranked, labels):
    scores = {row["label"]: row["score"] for row in ranked}
    return [scores[name] for name in labels]


async def send(session, url, request, reference, labels):
    try:
        async with session.post(url + request.path, data=request.body,
                                headers={"content-type": "application/json"}) as response:
            answer = await response.json(content_type=None)
            if "x-request-id" not in response.headers:
                return "no x-request-id header"
            return check_answer(request, response.status, answer, reference, labels)
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


async def run_turn(url, requests, concurrency, reference, labels):
    """Send `requests` with `concurrency` users; (seconds, [what was wrong, per wrong answer])."""
    wrong, next_index = [], 0

    async def user(session):
        nonlocal next_index
        while next_index < len(requests):
            request = requests[next_index]
            next_index += 1  # no await in between: one user at a time
            problem = await send(session, url, request, reference, labels)
            if problem is not None:
                wrong.append(problem)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
        return time.perf_counter() - started, wrong


# -----------------------------------------------------------------------------
# servers


@dataclass
class Server:
    name: str
    env: dict
    root: Path
    port: int
    max_requests: int = None  # stop this one after so many (None: the whole run)
    process: subprocess.Popen = None
    probe_out: Path = None
    rss: list = field(default_factory=list)  # (requests so far, the turn's peak RSS MB)
    rss_end: list = field(default_factory=list)  # (requests so far, RSS MB as the turn ended)
    seconds: float = 0.0
    turn_seconds: list = field(default_factory=list)
    wrong: list = field(default_factory=list)
    info: dict = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def start(server, model_dir, launch, probe, out_dir, load):
    env = {**os.environ, "PYTHONPATH": str(server.root), **server.env}
    if launch == "uvicorn":
        env["SERVE_MODEL_DIR"], env["SERVE_ACCESS_LOG"] = str(model_dir), "false"
        cmd = [sys.executable, "-m", "uvicorn", "serve.app:app_from_env", "--factory", "--host", "127.0.0.1",
               "--port", str(server.port), "--no-access-log", "--log-level", "warning"]
    else:
        module = "bench.memory_probe" if probe else "serve"
        cmd = [sys.executable, "-m", module, "--model_dir", str(model_dir), "--port", str(server.port),
               "--access_log", "false"]
        # The app's SERVE_<FLAG> variables, which its uvicorn factory reads, as flags of python -m serve.
        cmd += [arg for key, value in server.env.items() if key.startswith("SERVE_")
                for arg in (f"--{key.removeprefix('SERVE_').lower()}", value)]
    if probe:
        server.probe_out = out_dir / f"probe_{load}_{slug(server.name)}.jsonl"
        server.probe_out.unlink(missing_ok=True)
        env["PROBE_OUT"], env["PROBE_TRIM"] = str(server.probe_out), "1"
    log = open(out_dir / f"server_{load}_{slug(server.name)}.log", "w")
    server.process = subprocess.Popen(cmd, cwd=server.root, env=env, stdout=log, stderr=subprocess.STDOUT)


def slug(name):
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]


async def wait_healthy(server, timeout=300):
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"{server.name}: the server exited with code {server.process.returncode}")
            try:
                async with session.get(server.url + "/health") as response:
                    if response.status == 200:
                        async with session.get(server.url + "/info") as info:
                            server.info = await info.json()
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit(f"{server.name}: not healthy after {timeout} s")


def probe_sample(server, last=False):
    """Ask the probe for a sample (SIGUSR2 for the last one: it also trims) and wait for its line."""
    lines = server.probe_out.read_text().count("\n") if server.probe_out.exists() else 0
    server.process.send_signal(signal.SIGUSR2 if last else signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.probe_out.exists() and server.probe_out.read_text().count("\n") > lines:
            return
        time.sleep(0.2)


def stop(server):
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = server.process.wait()
    if code != 0:
        server.wrong.append(f"the server exited with code {code} after SIGTERM")


def soak(servers, load, requests, args, reference, labels, model_dir, out_dir):
    """Every server up, then turns of --sample_every requests each, alternating the order by turn."""
    for server in servers:
        start(server, model_dir, args.launch, args.probe, out_dir, load)
    try:
        for server in servers:
            asyncio.run(wait_healthy(server))
            server.rss.append((0, proc_status_mb(server.process.pid)["rss_mb"]))
            server.rss_end.append(server.rss[-1])
            if args.probe:
                probe_sample(server)
        turns = range(0, len(requests), args.sample_every)
        for turn, begin in enumerate(turns):
            chunk = requests[begin:begin + args.sample_every]
            for server in (servers if turn % 2 == 0 else servers[::-1]):
                if server.max_requests is not None and begin >= server.max_requests:
                    continue
                reset_peak_rss(server.process.pid)
                seconds, wrong = asyncio.run(run_turn(server.url, chunk, args.concurrency, reference, labels))
                done = begin + len(chunk)
                server.seconds += seconds
                server.turn_seconds.append(seconds)
                server.wrong += [f"request {begin}+: {w}" for w in wrong]
                status = proc_status_mb(server.process.pid)
                server.rss.append((done, status["peak_rss_mb"]))
                server.rss_end.append((done, status["rss_mb"]))
                if args.probe:
                    probe_sample(server, last=done == len(requests))
                print(f"  {load:6} {server.name:24} {done:7,} requests  peak RSS {server.rss[-1][1]:7.1f} MB  "
                      f"at the end {server.rss_end[-1][1]:7.1f} MB  "
                      f"{len(chunk) / seconds:5.1f} req/s  wrong {len(server.wrong)}", flush=True)
    finally:
        for server in servers:
            stop(server)


# -----------------------------------------------------------------------------
# training: one long run of train_loop.py, its RSS at every heartbeat


def train_soak(args, out_dir):
    """train_loop.py for --train_steps steps on a tiny BERT (hidden 32, 2 layers) and IMDb reviews cut at
    128 tokens, one heartbeat line per 1,000 steps; the loop's RSS is read as each line appears.
    Returns [(steps, RSS MB)] and the run's exit code."""
    from models import IMDB, WORDPIECE_VOCAB, save_tiny_bert

    work = out_dir / "train"
    shutil.rmtree(work, ignore_errors=True)
    encoder = save_tiny_bert(work / "tiny-bert", WORDPIECE_VOCAB, max_length=128)
    cmd = [sys.executable, "train_loop.py", "--model_name_or_path", str(encoder), "--dataset_name", str(IMDB),
           "--max_train_samples", "4000", "--max_length", "128", "--max_steps", str(args.train_steps),
           "--logging_steps", "1000", "--eval_strategy", "no", "--save_strategy", "no", "--plots", "false",
           "--report_to", "none", "--output_dir", str(work / "results"), "--logging_dir", str(work / "logs"),
           "--final_model_dir", str(work / "model")]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    rss, steps = [], 0
    with open(out_dir / "train.log", "w") as log:
        for line in process.stdout:
            log.write(line)
            if "{'loss'" in line:  # the heartbeat, every 1,000 steps (after tqdm's bar, maybe, on the same line)
                steps += 1000
                rss.append((steps, proc_status_mb(process.pid)["rss_mb"]))
                print(f"  train  {steps:7,} steps  RSS {rss[-1][1]:7.1f} MB  {line.strip()[:80]}", flush=True)
    return rss, process.wait()


# -----------------------------------------------------------------------------
# report


def reset_peak_rss(pid):
    """Start the process's peak RSS (VmHWM) again from its RSS now: what a turn needed at its worst is
    then its VmHWM at the end. The RSS at one instant depends on where the allocator is in its cycle
    (a malloc_trim just before, or a large batch); the peak over 1,000 requests is what the OS must
    find room for. Linux's clear_refs, value 5 (the process's owner or root)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def window(samples, end, width):
    """The samples of the turns ending in (end - width, end]."""
    return [mb for done, mb in samples if end - width < done <= end]


def window_growth(samples, check_from, check_to, width):
    """(median MB of the turns up to check_from, the same up to check_to, growth): each window `width`
    requests long. One turn's peak swings by 10-20% with what happened to coincide in it (an explanation
    during a batch of long reviews); a median of ten turns is the level the server keeps."""
    before = statistics.median(window(samples, check_from, width))
    after = statistics.median(window(samples, check_to, width))
    return before, after, after / before - 1


def verdict(server, args):
    """(passed, the pass line): the median peak RSS of the turns in the last --window requests up to
    --check_to within --max_growth of those up to --check_from, the RSS at the turns' ends likewise,
    every answer right, and the run long enough."""
    done = server.rss[-1][0]
    if done < args.check_from + args.window:  # the windows would overlap: no growth to speak of
        return False, (f"FAIL: {server.name}: stopped at {done:,} requests, too short to compare; {len(server.wrong)} "
                       f"wrong answers (the windows: {args.window:,} requests up to {args.check_from:,} and up to "
                       f"{args.check_to:,})")
    to = min(args.check_to, done - (done - args.check_from) % args.window)  # whole cycles after check_from
    peak_before, peak_after, peak_growth = window_growth(server.rss, args.check_from, to, args.window)
    end_before, end_after, end_growth = window_growth(server.rss_end, args.check_from, to, args.window)
    ok = max(peak_growth, end_growth) <= args.max_growth and not server.wrong and done >= args.check_to
    shortfall = "" if done >= args.check_to else f" (stopped at {done:,}: too short to pass)"
    span = lambda end: f"{end - args.window + 1:,}-{end:,}"
    return ok, (f"{'PASS' if ok else 'FAIL'}: {server.name}: median peak RSS per turn {peak_after:.0f} MB over "
                f"requests {span(to)}, {peak_before:.0f} MB over {span(args.check_from)}: {peak_growth:+.1%}; "
                f"RSS at the turns' end {end_after:.0f} against {end_before:.0f} MB: {end_growth:+.1%} "
                f"(limit {args.max_growth:+.0%} each); {done:,} requests, {len(server.wrong)} wrong answers{shortfall}")


def table(results, loads):
    """Markdown: requests, then RSS MB per (load, server)."""
    columns = [(load, server) for load in loads for server in results[load]]
    lines = ["| requests | " + " | ".join(f"{load}: {s.name}, peak RSS MB" for load, s in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    marks = sorted({done for _, s in columns for done, _ in s.rss})
    for done in marks:
        cells = [next((f"{mb:.0f}" for d, mb in s.rss if d == done), "") for _, s in columns]
        lines.append(f"| {done:,} | " + " | ".join(cells) + " |")
    lines.append("| req/s | " + " | ".join(f"{s.rss[-1][0] / s.seconds:.1f}" for _, s in columns) + " |")
    return "\n".join(lines)


def picture(results, loads, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loads), figsize=(6.5 * len(loads), 4.5), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for server in results[load]:
            line, = ax.plot(*zip(*server.rss), marker=".", label=f"{server.name}: the turn's peak")
            ax.plot(*zip(*server.rss_end), linestyle="--", color=line.get_color(), alpha=0.6,
                    label=f"{server.name}: at the turn's end")
        for end, label in ((args.check_from, "the windows compared"), (args.check_to, None)):
            ax.axvspan(end - args.window, end, color="0.9", zorder=0, label=label)  # window_problem: >= 0
        ax.set(title=f"{load} load, concurrency {args.concurrency}", xlabel="requests",
               ylabel=f"server's RSS per turn of {args.sample_every:,} requests (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def window_problem(args):
    """What is wrong with the windows the pass line compares, or None. Each must hold whole turns and
    whole explanation cycles (so that both explain the same reviews), the first must come after the
    server's start, and the second after the first."""
    if args.sample_every < 1:
        return f"--sample_every must be a positive number of requests, not {args.sample_every}"
    if args.window % args.sample_every or args.window % EXPLAIN_EVERY or args.window < 1:
        return (f"--window {args.window} must be a multiple of --sample_every ({args.sample_every}) and of "
                f"{EXPLAIN_EVERY:,} (one /explain each): the windows compared hold whole turns and explain the same reviews")
    if not args.window <= args.check_from < args.check_to:
        return (f"--check_from {args.check_from} must be at least --window ({args.window}) and below --check_to "
                f"({args.check_to}): the first window starts after the server does, the second after the first")
    if (args.check_to - args.check_from) % args.window:
        return (f"--check_to - --check_from ({args.check_to - args.check_from}) must be a multiple of --window "
                f"({args.window}): the windows compared explain the same reviews only whole cycles apart")
    return None


def explain_cycle(args):
    """How many reviews the mixed load explains in turn: one per EXPLAIN_EVERY requests of a window."""
    return args.window // EXPLAIN_EVERY


def parse_args():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="a save_pretrained folder; default: minilm-l6 + a seeded 2-label head")
    parser.add_argument("--load", nargs="+", choices=["single", "mixed"], default=["single", "mixed"])
    parser.add_argument("--requests", type=int, default=50_000, help="per load and server")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample_every", type=int, default=1000, help="requests per turn; RSS is read after each")
    parser.add_argument("--pool", type=int, default=1000, help="short reviews to draw from")
    parser.add_argument("--max_tokens", type=int, default=128, help="the short reviews' length, at most (tokens)")
    parser.add_argument("--long", type=int, default=50, help="the longest test reviews, drawn 5%% of the time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launch", choices=["python", "uvicorn"], default="python",
                        help="python -m serve, or uvicorn serve.app:app_from_env --factory")
    parser.add_argument("--server", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a server to soak, with what it adds to the environment; repeat for several "
                             "(default: one, `app`)")
    parser.add_argument("--compare_dir", help="also soak the app of another checkout, run from that folder")
    parser.add_argument("--compare_requests", type=int, help="stop the --compare_dir server after this many requests "
                                                               "(its growth shows early; the run goes on without it)")
    parser.add_argument("--probe", action="store_true", help="run each server under bench/memory_probe.py")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--check_from", type=int, default=10_000)
    parser.add_argument("--check_to", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=10_000,
                        help="requests whose turns' median RSS the pass line compares, up to --check_from and up to "
                             "--check_to; the mixed load's explained reviews come round once per window")
    parser.add_argument("--max_growth", type=float, default=0.05)
    parser.add_argument("--train_steps", type=int, help="instead of the server: one training run of this many steps "
                                                           "(tiny BERT), its RSS every 1,000 steps")
    parser.add_argument("--out", default="soak-results", help="folder for the PNG, the JSON and the servers' logs")
    args = parser.parse_args()
    if not args.train_steps and (problem := window_problem(args)):
        parser.error(problem)
    servers = []
    for name, *pairs in args.server or [["app"]]:
        if any("=" not in pair for pair in pairs):
            parser.error(f"--server {name}: give KEY=VALUE pairs after the name, got {pairs}")
        servers.append((name, dict(pair.split("=", 1) for pair in pairs), ROOT, None))
    if args.compare_dir:
        servers.append((f"app in {args.compare_dir}", {}, Path(args.compare_dir).resolve(), args.compare_requests))
    args.servers = servers
    return args


def main():
    args = parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.train_steps:
        return train_main(args, out_dir)
    # Absolute: a --compare_dir server runs from its own folder. Kept in --out: see review_pool.
    model_dir = (Path(args.model_dir) if args.model_dir else out_dir / "minilm-2labels").resolve()
    if not args.model_dir and not (model_dir / "config.json").exists():
        save_minilm_classifier(model_dir)
    short, long, reference, id2label = review_pool(model_dir, args.pool, args.max_tokens, args.long, args.seed, out_dir)
    labels = [id2label[i] for i in range(len(id2label))]
    print(f"{PROG}: {len(short)} reviews of <= {args.max_tokens} tokens and the {len(long)} longest; "
          f"model {model_dir}; {os.cpu_count()} CPUs; concurrency {args.concurrency}", flush=True)
    results = {}
    for load in args.load:
        requests = make_requests(load, args.requests, short, long, args.seed, explain_cycle(args))
        servers = [Server(name, env, root, args.port + i, limit)
                   for i, (name, env, root, limit) in enumerate(args.servers)]
        soak(servers, load, requests, args, reference, labels, model_dir, out_dir)
        results[load] = servers
    print("\n" + table(results, args.load) + "\n")
    failed = False
    for load in args.load:
        for server in results[load]:
            ok, line = verdict(server, args)
            failed |= not ok and server.root == ROOT  # a --compare_dir server is reported, not judged
            print(f"{load}: {line}")
            for problem in server.wrong[:5]:
                print(f"    {problem}")
            if server.info:
                print(f"    /info memory: {server.info.get('memory')}")
    picture(results, args.load, out_dir / "soak.png", args)
    with open(out_dir / "soak.json", "w") as f:
        json.dump({load: [{"name": s.name, "env": s.env, "peak_rss": s.rss, "rss_end": s.rss_end, "seconds": s.seconds,
                           "turn_seconds": s.turn_seconds, "wrong": s.wrong[:50],
                           "info_memory": (s.info or {}).get("memory")} for s in results[load]]
                   for load in args.load}, f, indent=1)
    print(f"picture: {out_dir / 'soak.png'}")
    sys.exit(1 if failed else 0)


def train_main(args, out_dir):
    rss, code = train_soak(args, out_dir)
    print("\n| steps | RSS MB |\n|---|---|")
    for steps, mb in rss:
        print(f"| {steps:,} | {mb:.0f} |")
    check_from = min(args.check_from, rss[-1][0]) if rss else 0
    before = [mb for steps, mb in rss if steps <= check_from][-1] if rss else float("nan")
    growth = rss[-1][1] / before - 1 if rss else float("nan")
    ok = code == 0 and bool(rss) and growth <= args.max_growth
    print(f"{'PASS' if ok else 'FAIL'}: training: RSS {rss[-1][1] if rss else float('nan'):.0f} MB after "
          f"{rss[-1][0] if rss else 0:,} steps, {before:.0f} MB after {check_from:,}: {growth:+.1%} "
          f"(limit {args.max_growth:+.0%}); exit code {code}")
    if rss:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot(*zip(*rss), marker=".", label="train_loop.py, tiny BERT")
        ax.set(title="training: one long run", xlabel="optimizer steps", ylabel="RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "soak_train.png", dpi=110)
        plt.close(fig)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
