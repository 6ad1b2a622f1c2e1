"""Where a server's memory goes, one suspect at a time, without HTTP: each in a fresh process.

    python -m bench.memory_suspects                          # every suspect, minilm-l6 + a 2-label head
    python -m bench.memory_suspects --suspects model allocators --batches 600

Suspects (each run prints its resident memory, RSS, every --every batches or calls):
- model: the serving path itself, Classifier.submit() of batches of 1-16 IMDb reviews through the
  batching worker (packed batches, as the server runs them on a CPU), under each candidate setting
  of the allocator and of oneDNN, side by side, the same batches for each:
    glibc                     the default: glibc's malloc, oneDNN's primitive cache of 1,024
    onednn-cache-0            ONEDNN_PRIMITIVE_CACHE_CAPACITY=0: no cached oneDNN primitives
    onednn-cache-64, -256     a smaller cache than oneDNN's 1,024
    arena-max-2               MALLOC_ARENA_MAX=2: two glibc arenas instead of up to 8 per core
    mmap-threshold-fixed      MALLOC_MMAP_THRESHOLD_=131072: glibc's fixed threshold; blocks above 128 KB
                              get their own mmap and go back to the OS when freed
    cpu-speed-reuse           cpu_speed.reuse_freed_memory(), as train_loop.py sets it (never returned)
    jemalloc, tcmalloc        the distribution's libjemalloc2 / libtcmalloc-minimal4 through LD_PRELOAD
    server                    what the server does now: glibc as it comes, packed batches over the
                              model's maximum padded to a multiple of 64 tokens (a bounded shape set),
                              glibc's malloc_trim every 10 s and after each explanation
  Every variant but `server` runs with --pad_to_multiple_of 1 and --malloc_trim_interval 0, as before the fix.
- tokenizer: the Rust tokenizer's encode_batch alone, on the same reviews.
- explainer: POST /explain's engine alone (serve/explaining.py), short reviews one after another,
  under the same settings; explainer-any-length: the same with reviews of every length (to 512 tokens,
  cut), so that new shapes keep coming (one per length, forward and backward, where it does not pad).

The figure of merit is the growth after the warm-up (from --from_batch to the end) and the seconds
per batch (a remedy that costs throughput is a trade-off, not a fix). BENCHMARKS.md has a run.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from models import IMDB_TEST, save_minilm_classifier  # noqa: E402

PROG = "python -m bench.memory_suspects"
LIBDIR = "/usr/lib/x86_64-linux-gnu"
# name -> what the run's environment adds; SUSPECT_PAD_TO_MULTIPLE_OF is the server's --pad_to_multiple_of
GLIBC_DYNAMIC = {"SUSPECT_PAD_TO_MULTIPLE_OF": "1", "SUSPECT_MALLOC_TRIM_INTERVAL": "0"}  # glibc as it comes, a new shape nearly every batch: before the fix
VARIANTS = {
    "glibc": GLIBC_DYNAMIC,
    "onednn-cache-0": {**GLIBC_DYNAMIC, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
    "onednn-cache-64": {**GLIBC_DYNAMIC, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"},
    "onednn-cache-256": {**GLIBC_DYNAMIC, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"},
    "arena-max-2": {**GLIBC_DYNAMIC, "MALLOC_ARENA_MAX": "2"},
    "mmap-threshold-fixed": {**GLIBC_DYNAMIC, "MALLOC_MMAP_THRESHOLD_": "131072"},
    "cpu-speed-reuse": {**GLIBC_DYNAMIC, "SUSPECT_REUSE_FREED_MEMORY": "1"},
    "jemalloc": {**GLIBC_DYNAMIC, "LD_PRELOAD": f"{LIBDIR}/libjemalloc.so.2"},
    "tcmalloc": {**GLIBC_DYNAMIC, "LD_PRELOAD": f"{LIBDIR}/libtcmalloc_minimal.so.4"},
    "server": {},  # the server as it runs now: bounded shapes (serve/packed.py), malloc_trim (serve/memory.py)
}


def limits():
    from serve.batching import Limits

    changes = {name: kind(os.environ[f"SUSPECT_{name.upper()}"]) for name, kind in
               (("pad_to_multiple_of", int), ("malloc_trim_interval", float)) if f"SUSPECT_{name.upper()}" in os.environ}
    return Limits(**changes)


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def reviews(n, seed=0):
    """`n` IMDb test reviews, shuffled: mixed lengths, 5% of them over BERT's 512 tokens."""
    import pandas as pd

    texts = pd.read_parquet(IMDB_TEST)["text"].tolist()
    rng = random.Random(seed)
    short = [t for t in texts if len(t) < 700]
    long = [t for t in texts if len(t) > 3000]
    return [rng.choice(long) if rng.random() < 0.05 else rng.choice(short) for _ in range(n)]


# -----------------------------------------------------------------------------
# one suspect, in this process


def run_model(model_dir, batches, every, seed):
    import torch  # noqa: F401 (loaded before the setting below, as in a server)

    if os.environ.get("SUSPECT_REUSE_FREED_MEMORY") == "1":
        from training import cpu_speed

        cpu_speed.reuse_freed_memory()
    from serve.classifier import Classifier

    rng = random.Random(seed)
    pool = reviews(2000, seed)
    classifier = Classifier(model_dir, limits(), "cpu")
    curve, started = [(0, rss_mb())], time.perf_counter()
    for i in range(1, batches + 1):
        classifier.submit(rng.sample(pool, rng.randint(1, 16))).result()
        if i % every == 0:
            curve.append((i, rss_mb()))
    seconds = time.perf_counter() - started
    classifier.close()
    return {"curve": curve, "seconds_per_batch": seconds / batches}


def run_tokenizer(model_dir, batches, every, seed):
    from transformers import AutoTokenizer

    from model_utils import bare_tokenizer

    core = bare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    core.enable_truncation(512)
    rng = random.Random(seed)
    pool = reviews(2000, seed)
    curve, started = [(0, rss_mb())], time.perf_counter()
    for i in range(1, batches + 1):
        core.encode_batch(rng.sample(pool, rng.randint(1, 16)))
        if i % every == 0:
            curve.append((i, rss_mb()))
    return {"curve": curve, "seconds_per_batch": (time.perf_counter() - started) / batches}


def run_explainer(model_dir, batches, every, seed, max_chars=300):
    from dataclasses import asdict
    from types import SimpleNamespace

    from serve.explaining import load_explaining

    rng = random.Random(seed)
    pool = [t for t in reviews(2000, seed) if max_chars is None or len(t) < max_chars]
    # the server's settings (serve/app.py's ServeConfig is Limits and these): the trim, the padding
    cfg = SimpleNamespace(**asdict(limits()), max_concurrent_explains=1, explain_n_steps=32)
    explaining = load_explaining(model_dir, cfg, "cpu")
    curve, started = [(0, rss_mb())], time.perf_counter()
    trimmer = explaining.trimmer
    for i in range(1, batches + 1):
        explaining.submit(rng.choice(pool), "right").result()
        while trimmer.enabled and trimmer.trims < i:  # its thread trims after answering: read the RSS after that
            time.sleep(0.001)
        if i % every == 0:
            curve.append((i, rss_mb()))
    explaining.close()
    return {"curve": curve, "seconds_per_batch": (time.perf_counter() - started) / batches}


RUNS = {"model": run_model, "tokenizer": run_tokenizer, "explainer": run_explainer,
        "explainer-any-length": partial(run_explainer, max_chars=None)}


# -----------------------------------------------------------------------------
# every suspect, each in a fresh process


def in_subprocess(suspect, env, args, model_dir):
    cmd = [sys.executable, "-m", "bench.memory_suspects", "--run", suspect, "--model_dir", str(model_dir),
           "--batches", str(args.batches), "--every", str(args.every), "--seed", str(args.seed)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(name, result, from_batch):
    if "error" in result:
        return f"| {name} | failed: {result['error']} | | | |"
    curve = dict(result["curve"])
    start = max(b for b in curve if b <= from_batch)
    first, last = curve[start], result["curve"][-1][1]
    points = " ".join(f"{mb:.0f}" for _, mb in result["curve"])
    return (f"| {name} | {points} | {last - first:+.0f} MB ({last / first - 1:+.1%}) | "
            f"{result['seconds_per_batch'] * 1000:.0f} |")


def first_layers(model_dir, n, out_dir):
    """The model with its first `n` encoder layers only, saved as a model folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.bert.encoder.layer = model.bert.encoder.layer[:n]
    model.config.num_hidden_layers = n
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def main():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="default: minilm-l6 + a seeded 2-label head")
    parser.add_argument("--suspects", nargs="+", default=["model", "tokenizer", "explainer"], choices=list(RUNS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the settings the model and the explainer run under")
    parser.add_argument("--batches", type=int, default=600, help="batches (explanations: --batches / 20)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--from_batch", type=int, default=100, help="growth is measured from here (after warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_layers", type=int, help="keep the model's first N layers only: the same tensor sizes "
                                                         "per layer at a fraction of the time (a quick screen)")
    parser.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)  # one suspect, in this process
    args = parser.parse_args()
    if args.run:
        print(json.dumps(RUNS[args.run](args.model_dir, args.batches, args.every, args.seed)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or save_minilm_classifier(Path(tmp) / "minilm-2labels")
        if args.num_layers:
            model_dir = first_layers(model_dir, args.num_layers, Path(tmp) / f"first-{args.num_layers}-layers")
        print(f"| suspect | RSS MB every {args.every} batches | growth after batch {args.from_batch} | ms per batch |")
        print("|---|---|---|---|")
        for suspect in args.suspects:
            if suspect == "model":
                runs = [(f"model, {name}", VARIANTS[name], args) for name in args.variants]
            elif suspect.startswith("explainer"):  # an explanation costs some 50 batches
                fewer = argparse.Namespace(**{**vars(args), "batches": max(2, args.batches // 20),
                                              "every": max(1, args.every // 20)})
                runs = [(f"{suspect}, {name}", VARIANTS[name], fewer) for name in args.variants]
            else:
                runs = [(suspect, {}, args)]
            for name, env, run_args in runs:
                result = in_subprocess(suspect, env, run_args, model_dir)
                from_batch = args.from_batch if not suspect.startswith("explainer") else args.from_batch // 20
                print(describe(name, result, from_batch), flush=True)


if __name__ == "__main__":
    main()
