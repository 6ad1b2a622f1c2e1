"""Training and evaluation speed, side by side: HF Trainer as in the seed, Trainer at its best, our loop.

    flock /tmp/cpu-bench.lock python bench.py                  # the comparison, ~10 min on 2 CPU cores
    flock /tmp/cpu-bench.lock python bench.py --what knobs     # threads, SDPA vs eager, torch.compile
    flock /tmp/cpu-bench.lock python bench.py --what tokenize  # full IMDb (50k reviews): first and cached
    python bench.py --train_samples 16 --eval_samples 16       # a quick smoke run

Every variant trains the same model on the same rows (a seeded shuffle of the train split), with
the same batch size, sequence limit and number of steps, then evaluates the same rows:

    (a) trainer_seed   Trainer, rows padded to the longest in `.map(padding=True)`: all 512 tokens
    (b) trainer_best   Trainer + DataCollatorWithPadding + train_sampling_strategy="group_by_length"
    (c) ours           train_loop.py with its defaults

Each runs in a fresh subprocess, so its peak memory (ru_maxrss) is its own and no variant warms
caches for the next. The matmul peak that MFU is measured against is timed in the same run.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

DEFAULTS = dict(model="../shared/models/minilm-l6", data="../shared/data/imdb", train_samples=96, eval_samples=200,
                batch_size=8, max_length=512, threads=2, seed=42)
VARIANTS = {"trainer_seed": "(a) Trainer, seed", "trainer_best": "(b) Trainer, best", "ours": "(c) our loop"}
KNOBS = {  # name: (threads, extra train_loop flags)
    "threads=2 sdpa": (2, []),
    "threads=1 sdpa": (1, []),
    "threads=2 eager": (2, ["--attn_implementation", "eager"]),
    "threads=2 sdpa torch_compile": (2, ["--torch_compile", "true"]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--what", choices=["compare", "knobs", "tokenize"], default="compare")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--flags", default="[]", help=argparse.SUPPRESS)  # internal: extra train_loop flags
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)  # internal: datasets cache for --what tokenize
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# what is measured: FLOPs, the matmul peak, the batches each variant really ran


def flops_per_row(length, cfg, nonembedding_params):
    """Training FLOPs for one row of `length` real tokens (forward + backward = 3x forward).

    Matmuls with the weights: 2 FLOPs per weight per token forward -> 6 * N * T for training.
    Attention scores QK^T and the weighted sum AV: 2 * T^2 * d each per layer forward -> 12 * L * d * T^2.
    Embedding lookups are not matmuls and are left out (N counts no embedding weights).
    """
    return 6 * nonembedding_params * length + 12 * cfg.num_hidden_layers * cfg.hidden_size * length**2


def matmul_peak(threads, size=2048, seconds=2.0, trials=3):
    """Best fp32 GFLOP/s of a large square matmul with `threads` threads: the machine's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for _ in range(trials):
        a @ b  # warm-up: thread pool and caches
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e9)
    return best


class BatchRecorder:
    """Wraps a collator and notes (padded tokens, real tokens) of each batch, per phase."""

    def __init__(self, collator):
        self.collator = collator
        self.phase = "train"
        self.tokens = {"train": [0, 0], "eval": [0, 0]}  # phase: [padded slots, real tokens]

    def __call__(self, features):
        batch = self.collator(features)
        phase = "eval" if "row" in features[0] else self.phase  # our eval batches carry row numbers
        self.tokens[phase][0] += batch["attention_mask"].numel()
        self.tokens[phase][1] += int(batch["attention_mask"].sum())
        return batch


# -----------------------------------------------------------------------------
# the variants, each run in its own process


def load_subsets(args, tokenizer):
    """The rows every variant uses: seeded shuffles of train and test, as train_loop.py takes them."""
    import data

    splits = data.load_splits(args.data, "train", "test")
    label_names = data.validate(splits, "text", "label")
    limits = {"train": args.train_samples, "eval": args.eval_samples}
    return {role: data.take_subset(ds, limits[role], args.seed) for role, ds in splits.items()}, label_names


def run_trainer(args, best):
    """Trainer as the seed tutorial writes it (best=False), or with its speed options (best=True)."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, default_data_collator)

    from metrics import ClassificationMetrics

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits, label_names = load_subsets(args, tokenizer)
    padding = False if best else True  # the seed: pad in .map, to the longest of each 1000-row map batch

    def encode(batch):
        return tokenizer(batch["text"], padding=padding, truncation=True, max_length=args.max_length)

    tokenized = {role: ds.map(encode, batched=True, remove_columns=["text"]) for role, ds in splits.items()}
    recorder = BatchRecorder(DataCollatorWithPadding(tokenizer) if best else default_data_collator)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(label_names))
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=5e-5, weight_decay=0.01, seed=args.seed,
        eval_strategy="no", save_strategy="no", logging_steps=500, report_to="none", use_cpu=True,
        train_sampling_strategy="group_by_length" if best else "random",
    )

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return ClassificationMetrics(keep_in_memory=True).compute(
            predictions=logits.argmax(-1).tolist(), references=labels.tolist())

    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized["train"],
                      eval_dataset=tokenized["eval"], data_collator=recorder, compute_metrics=compute_metrics)
    train_runtime = trainer.train().metrics["train_runtime"]
    recorder.phase = "eval"
    scores = trainer.evaluate()
    return result(recorder, train_runtime, scores["eval_runtime"], scores["eval_accuracy"], model)


def run_ours(args, flags):
    """train_loop.py's own path (its defaults), with the collator wrapped to count tokens."""
    import data
    import train_loop

    recorders = []

    def recording_collator(tokenizer, mixed_precision, build=data.build_collator):
        recorders.append(BatchRecorder(build(tokenizer, mixed_precision)))
        return recorders[-1]

    data.build_collator = recording_collator
    out = tempfile.mkdtemp()
    final = train_loop.main([
        "--model_name_or_path", args.model, "--dataset_name", args.data,
        "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--num_train_epochs", "1", "--seed", str(args.seed),
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "500",
        "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs", "--final_model_dir", f"{out}/model",
        *flags,
    ])
    with open(f"{out}/results/log_history.jsonl") as f:
        summary = next(r for r in map(json.loads, f) if "train_runtime" in r)
    return result(recorders[0], summary["train_runtime"], final["eval_runtime"], final["eval_accuracy"])


def result(recorder, train_runtime, eval_runtime, accuracy, model=None):
    return {"train_runtime": train_runtime, "eval_runtime": eval_runtime, "eval_accuracy": accuracy,
            "tokens": recorder.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_tokenize(args):
    """Tokenize all of IMDb (train + test, 50k reviews) as train_loop.py does; print the seconds."""
    import datasets

    import data
    import model_utils

    tokenizer = model_utils.load_tokenizer(args.model)
    splits = datasets.load_dataset(args.data, cache_dir=args.cache_dir)
    names = splits["train"].features["label"].names
    start = time.perf_counter()
    for ds in splits.values():
        data.tokenize(ds, tokenizer, "text", "label", names, args.max_length)
    return {"seconds": time.perf_counter() - start, "rows": sum(len(ds) for ds in splits.values())}


def child_main(args):
    torch.set_num_threads(args.threads)
    if args.variant == "tokenize":
        outcome = run_tokenize(args)
    elif args.variant == "ours":
        outcome = run_ours(args, json.loads(args.flags))
    else:
        outcome = run_trainer(args, best=args.variant == "trainer_best")
    print("BENCH_RESULT " + json.dumps(outcome), flush=True)


# -----------------------------------------------------------------------------
# the parent: run the variants one after another, then the table


def spawn(args, variant, threads=None, flags=(), cache_dir=None):
    """One variant in a fresh interpreter; its result dict, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--flags", json.dumps(list(flags)),
           *[f"--{k}={getattr(args, k) if k != 'threads' or threads is None else threads}" for k in DEFAULTS]]
    if cache_dir:
        cmd.append(f"--cache_dir={cache_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or args.threads), "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {done.returncode}"}
    print(f"  {variant} {' '.join(flags)}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def train_set_flops(args):
    """(real tokens, training FLOPs) of one epoch over the training rows: the same for every variant."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits, _ = load_subsets(args, tokenizer)
    lengths = [len(ids) for ids in tokenizer(list(splits["train"]["text"]), truncation=True, max_length=args.max_length)["input_ids"]]
    cfg = AutoConfig.from_pretrained(args.model)
    encoder = AutoModel.from_config(cfg)
    nonembedding = sum(p.numel() for name, p in encoder.named_parameters() if not name.startswith("embeddings."))
    return sum(lengths), sum(flops_per_row(t, cfg, nonembedding) for t in lengths), nonembedding


def summarize(r, args, real_tokens, flops, peak):
    padded, real = r["tokens"]["train"]
    return {
        "train samples/s": args.train_samples / r["train_runtime"],
        "real tokens/s": real_tokens / r["train_runtime"],
        "padded share": 1 - real / padded,
        "eval samples/s": args.eval_samples / r["eval_runtime"],
        "eval padded share": 1 - r["tokens"]["eval"][1] / r["tokens"]["eval"][0],
        "train MFU": flops / r["train_runtime"] / (peak * 1e9),
        "peak RSS MB": r["peak_rss_mb"],
        "eval accuracy": r["eval_accuracy"],
    }


def markdown_table(rows):
    """rows: {label: {column: value}} -> a markdown table."""
    columns = list(next(iter(rows.values())).keys())
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows.items():
        cells = [f"{v:.1%}" if "share" in c or "MFU" in c else f"{v:.3f}" if "accuracy" in c else
                 f"{v:,.0f}" if v >= 100 else f"{v:.2f}" for c, v in row.items()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(args):
    return (f"`{' '.join(['python', 'bench.py', *sys.argv[1:]])}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.processor() or platform.machine()} {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} threads; model {args.model}, {args.train_samples} train / {args.eval_samples} eval rows, "
            f"batch {args.batch_size}, max_length {args.max_length}, fp32, 1 epoch")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def compare(args):
    real_tokens, flops, nonembedding = train_set_flops(args)
    peak = matmul_peak(args.threads)
    print(f"matmul peak {peak:.1f} GFLOP/s ({args.threads} threads); {real_tokens:,} real training tokens, "
          f"{flops / real_tokens / 1e6:.1f} MFLOP per token (N = {nonembedding / 1e6:.1f}M non-embedding)", file=sys.stderr)
    results = {label: spawn(args, variant) for variant, label in VARIANTS.items()}
    peak = max(peak, matmul_peak(args.threads))  # and after: the better of the two if the machine was busy once
    rows = {label: summarize(r, args, real_tokens, flops, peak) for label, r in results.items() if "error" not in r}
    print(f"\n{header(args)}\nmatmul peak {peak:.1f} GFLOP/s; {flops / real_tokens / 1e6:.1f} MFLOP per real "
          f"training token\n\n{markdown_table(rows)}\n")
    a, b, c = (rows.get(label) for label in VARIANTS.values())
    if a and b and c:
        ratios = {"(c)/(a)": {k: c[k] / a[k] for k in ("train samples/s", "eval samples/s")},
                  "(c)/(b)": {k: c[k] / b[k] for k in ("train samples/s", "eval samples/s")}}
        print("| ratio | train samples/s | eval samples/s |\n|---|---|---|")
        for name, r in ratios.items():
            print(f"| {name} | {r['train samples/s']:.2f}x | {r['eval samples/s']:.2f}x |")


def knobs(args):
    real_tokens, flops, _ = train_set_flops(args)
    peaks = {t: matmul_peak(t) for t in (1, 2)}
    rows = {}
    for name, (threads, flags) in KNOBS.items():
        r = spawn(args, "ours", threads=threads, flags=flags)
        if "error" not in r:
            rows[name] = summarize(r, args, real_tokens, flops, peaks[threads])
            rows[name]["train runtime s"] = r["train_runtime"]
    print(f"\n{header(args)}\nmatmul peaks {', '.join(f'{t} threads {p:.1f}' for t, p in peaks.items())} GFLOP/s "
          f"(MFU against the peak of the same thread count)\n\n{markdown_table(rows)}\n")


def tokenize(args):
    cache_dir = tempfile.mkdtemp(prefix="bench-tokenize-")
    first = spawn(args, "tokenize", cache_dir=cache_dir)
    cached = spawn(args, "tokenize", cache_dir=cache_dir)
    print(f"\n{header(args)}\n\n| tokenization of {first['rows']:,} reviews (max_length {args.max_length}) "
          f"| seconds | reviews/s |\n|---|---|---|")
    for name, r in (("first (empty cache)", first), ("cached (a new process)", cached)):
        print(f"| {name} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} |")


if __name__ == "__main__":
    arguments = parse_args()
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # ../shared/... is relative to the repository root
    if arguments.variant:
        child_main(arguments)
    else:
        {"compare": compare, "knobs": knobs, "tokenize": tokenize}[arguments.what](arguments)
