"""Training and evaluation speed, side by side: HF Trainer as in the seed, Trainer at its best, our loop.

    flock /tmp/cpu-bench.lock python -m bench.train_speed                  # the comparison (minutes)
    flock /tmp/cpu-bench.lock python -m bench.train_speed --what knobs     # threads, SDPA vs eager, torch.compile, cpu_speed
    flock /tmp/cpu-bench.lock python -m bench.train_speed --what tokenize  # full IMDb (50k reviews): first and cached
    flock /tmp/cpu-bench.lock python -m bench.train_speed --what profile   # where a training step's time goes
    python -m bench.train_speed --train_samples 16 --eval_samples 16       # a quick smoke run

Every variant trains the same model on the same rows (a seeded shuffle of the train split), with
the same batch size, sequence limit and number of steps, then evaluates the same rows:

    (a) trainer_seed   Trainer, rows padded to the longest in `.map(padding=True)`: all 512 tokens
    (b) trainer_best   Trainer + DataCollatorWithPadding + train_sampling_strategy="group_by_length"
    (b+) trainer_best_cpu_speed   (b) + our two CPU changes (training/cpu_speed.py): what is left is batching
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

from bench.measure import matmul_peak, training_flops
import model_utils
from training.errors import exit_on_usage_error

PROG = "python -m bench.train_speed"
DEFAULTS = dict(model="../shared/models/minilm-l6", data="../shared/data/imdb", train_samples=96, eval_samples=200,
                batch_size=8, max_length=512, threads=2, seed=42)
VARIANTS = {"trainer_seed": "(a) Trainer, seed", "trainer_best": "(b) Trainer, best",
            "trainer_best_cpu_speed": "(b+) Trainer, best + cpu_speed.py", "ours": "(c) our loop"}
KNOBS = {  # name: (threads, extra train_loop flags)
    "threads=2 sdpa": (2, []),
    "threads=1 sdpa": (1, []),
    "threads=2 eager (fast dropout for hidden states only)": (2, ["--attn_implementation", "eager"]),
    "threads=2 sdpa torch_compile": (2, ["--torch_compile", "true"]),
    "threads=2 sdpa, torch's dropout": (2, ["--fast_dropout", "false"]),
    "threads=2 sdpa, glibc mmap per tensor": (2, ["--reuse_cpu_memory", "false"]),
    "threads=2 sdpa, neither cpu_speed change": (2, ["--fast_dropout", "false", "--reuse_cpu_memory", "false"]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each variant, interleaved (a, b, c, a, b, c): the fastest counts. The "
                             "machine is shared, and a neighbour's burst slows whichever run it lands on")
    parser.add_argument("--what", choices=["compare", "knobs", "tokenize", "profile"], default="compare")
    parser.add_argument("--no_cpu_speed", action="store_true",
                        help="with --what profile: torch's own dropout and memory handling (the 'before' profile)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--flags", default="[]", help=argparse.SUPPRESS)  # internal: extra train_loop flags
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)  # internal: datasets cache for --what tokenize
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# what is measured besides FLOPs and the matmul peak (bench/measure.py): the batches each variant ran


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


def run_trainer(args, best, with_cpu_speed=False):
    """Trainer as the seed tutorial writes it (best=False), or with its speed options (best=True).

    with_cpu_speed: also our two CPU changes (training/cpu_speed.py), which are not Trainer options; this
    variant shows how much of our loop's lead is theirs and how much is batching.
    """
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, default_data_collator)

    from training.metrics import ClassificationMetrics

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    splits, label_names = load_subsets(args, tokenizer)
    padding = False if best else True  # the seed: pad in .map, to the longest of each 1000-row map batch

    def encode(batch):
        return tokenizer(batch["text"], padding=padding, truncation=True, max_length=args.max_length)

    tokenized = {role: ds.map(encode, batched=True, remove_columns=["text"]) for role, ds in splits.items()}
    recorder = BatchRecorder(DataCollatorWithPadding(tokenizer) if best else default_data_collator)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(label_names))
    if with_cpu_speed:
        from training import cpu_speed

        cpu_speed.use_fast_dropout(model)
        cpu_speed.reuse_freed_memory()
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
    import train_loop

    recorders = []

    def recording(collator):
        recorders.append(BatchRecorder(collator))
        return recorders[-1]

    out = tempfile.mkdtemp()
    _, final = train_loop.run_training(loop_config(args, out, flags), wrap_collator=recording)
    with open(f"{out}/results/log_history.jsonl") as f:
        summary = next(r for r in map(json.loads, f) if "train_runtime" in r)
    return result(recorders[0], summary["train_runtime"], final["eval_runtime"], final["eval_accuracy"])


def loop_config(args, out, flags=()):
    """train_loop.py's config for the benchmark's rows, batch and length, writing under `out`."""
    import train_loop

    return train_loop.parse_config([
        "--model_name_or_path", args.model, "--dataset_name", args.data,
        "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
        "--max_length", str(args.max_length), "--num_train_epochs", "1", "--seed", str(args.seed),
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "500",
        "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs", "--final_model_dir", f"{out}/model",
        *flags,
    ])


def result(recorder, train_runtime, eval_runtime, accuracy, model=None):
    return {"train_runtime": train_runtime, "eval_runtime": eval_runtime, "eval_accuracy": accuracy,
            "tokens": recorder.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_tokenize(args):
    """Tokenize all of IMDb (train + test, 50k reviews) as train_loop.py does; print the seconds."""
    import datasets

    import data

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
    else:
        # Other people's jobs share this machine: the peak is timed right before and after the run,
        # so each variant's MFU is measured against what the machine gave at that time.
        peak_before = matmul_peak(seconds=1.5, trials=2) / 1e9
        if args.variant == "ours":
            outcome = run_ours(args, json.loads(args.flags))
        else:
            outcome = run_trainer(args, best=args.variant.startswith("trainer_best"),
                                  with_cpu_speed=args.variant == "trainer_best_cpu_speed")
        outcome["peaks"] = [peak_before, matmul_peak(seconds=1.5, trials=2) / 1e9]
    print("BENCH_RESULT " + json.dumps(outcome), flush=True)


# -----------------------------------------------------------------------------
# the parent: run the variants one after another, then the table


def spawn(args, variant, threads=None, flags=(), cache_dir=None):
    """One variant in a fresh interpreter; its result dict, or {"error": ...}."""
    cmd = [sys.executable, "-m", "bench.train_speed", "--variant", variant, "--flags", json.dumps(list(flags)),
           *[f"--{k}={getattr(args, k) if k != 'threads' or threads is None else threads}" for k in DEFAULTS]]
    if cache_dir:
        cmd.append(f"--cache_dir={cache_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or args.threads), "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1800 s"}
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
    nonembedding = model_utils.count_parameters(AutoModel.from_config(cfg), embeddings=False)
    return sum(lengths), sum(training_flops(t, cfg, nonembedding) for t in lengths), nonembedding


def fastest(runs):
    """The run that trained fastest, with the fastest evaluation of all runs and the highest memory peak."""
    best = dict(min(runs, key=lambda r: r["train_runtime"]))
    best["eval_runtime"] = min(r["eval_runtime"] for r in runs)
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def summarize(r, args, real_tokens, flops):
    padded, real = r["tokens"]["train"]
    peak = sum(r["peaks"]) / 2
    return {
        "train samples/s": args.train_samples / r["train_runtime"],
        "real tokens/s": real_tokens / r["train_runtime"],
        "padded share": 1 - real / padded,
        "eval samples/s": args.eval_samples / r["eval_runtime"],
        "eval padded share": 1 - r["tokens"]["eval"][1] / r["tokens"]["eval"][0],
        "matmul peak GFLOP/s": peak,
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
    return (f"`{' '.join(['python', '-m', 'bench.train_speed', *sys.argv[1:]])}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()} {model_utils.device_name('cpu')}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} threads; model {args.model}, {args.train_samples} train / {args.eval_samples} eval rows, "
            f"batch {args.batch_size}, max_length {args.max_length}, fp32, 1 epoch, best of {args.repeats} runs")


def compare(args):
    real_tokens, flops, nonembedding = train_set_flops(args)
    print(f"{real_tokens:,} real training tokens, {flops / real_tokens / 1e6:.1f} MFLOP per token "
          f"(N = {nonembedding / 1e6:.1f}M non-embedding)", file=sys.stderr)
    runs = {label: [] for label in VARIANTS.values()}
    for _ in range(args.repeats):
        for variant, label in VARIANTS.items():
            runs[label].append(spawn(args, variant))
    rows = {label: summarize(fastest(r), args, real_tokens, flops) for label, r in runs.items()
            if not any("error" in x for x in r)}
    print(f"\n{header(args)}\n{flops / real_tokens / 1e6:.1f} MFLOP per real training token; MFU against the mean "
          f"of a matmul peak timed right before and after each variant\n\n{markdown_table(rows)}\n")
    c = rows.get(VARIANTS["ours"])
    print("| ratio | train samples/s | eval samples/s |\n|---|---|---|")
    for variant, label in VARIANTS.items():
        other = rows.get(label)
        if c and other and variant != "ours":
            name = f"(c)/{label.split()[0]}"
            print(f"| {name} | {c['train samples/s'] / other['train samples/s']:.2f}x | "
                  f"{c['eval samples/s'] / other['eval samples/s']:.2f}x |")


def knobs(args):
    real_tokens, flops, _ = train_set_flops(args)
    runs = {name: [] for name in KNOBS}
    for _ in range(args.repeats):
        for name, (threads, flags) in KNOBS.items():
            runs[name].append(spawn(args, "ours", threads=threads, flags=flags))
    rows = {}
    for name, r in runs.items():
        if any("error" in x for x in r):
            print(f"{name}: {[x.get('error') for x in r]}")
            continue
        rows[name] = summarize(fastest(r), args, real_tokens, flops)
        rows[name]["train runtime s"] = fastest(r)["train_runtime"]
    print(f"\n{header(args)}\nour loop; MFU against a matmul peak timed with the same thread count right before "
          f"and after each run\n\n{markdown_table(rows)}\n")


def tokenize(args):
    cache_dir = tempfile.mkdtemp(prefix="bench-tokenize-")
    first = spawn(args, "tokenize", cache_dir=cache_dir)
    cached = spawn(args, "tokenize", cache_dir=cache_dir)
    print(f"\n{header(args)}\n\n| tokenization of {first['rows']:,} reviews (max_length {args.max_length}) "
          f"| seconds | reviews/s |\n|---|---|---|")
    for name, r in (("first (empty cache)", first), ("cached (a new process)", cached)):
        print(f"| {name} | {r['seconds']:.2f} | {r['rows'] / r['seconds']:,.0f} |")


# Operator families of a BERT training step, by ATen name.
OP_FAMILIES = {
    "matmuls (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "dropout masks (bernoulli_, or cpu_speed's keep_mask)": ("aten::bernoulli_", "cpu_speed::keep_mask"),
    "attention softmax fwd+bwd": ("aten::_softmax", "aten::_softmax_backward_data"),
    "AdamW (fused)": ("aten::_fused_adamw_",),
}


def profile(args, steps=4):
    """Where our loop's training step spends its time, on the benchmark's own batches (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import data
    import train_loop

    torch.set_num_threads(args.threads)
    # train_loop's own setup: its model (with the CPU speed-ups unless --no_cpu_speed), collator and AdamW
    stock = ["--fast_dropout", "false", "--reuse_cpu_memory", "false"] if args.no_cpu_speed else []
    cfg = loop_config(args, tempfile.mkdtemp(), stock)
    setup = train_loop.build(cfg)
    train_ds, collator, model = setup.train_ds, setup.train_dl.collate_fn, setup.model.train()
    lengths = data.token_lengths(train_ds)
    batches = data.length_grouped_batches(lengths, args.batch_size, 1, torch.Generator().manual_seed(args.seed))
    batches = batches[1: steps + 2]  # skip the longest-first step: a typical mix, warm-up first
    optimizer = train_loop.build_optimizer(model, cfg)

    def step(rows):
        loss = model(**collator([train_ds[i] for i in rows])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for rows in batches[1:]:
            step(rows)
    wall = time.perf_counter() - start
    # Operators by their own time; a named block of ours (cpu_speed::keep_mask) by its whole time,
    # since the operators inside it (the seed draw, the compare) are part of drawing the mask.
    averages = prof.key_averages()
    self_time = {e.key: e.self_cpu_time_total / 1e6 for e in averages}
    self_time.update({e.key: e.cpu_time_total / 1e6 for e in averages if e.key.startswith("cpu_speed::")})
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    families = {name: sum(self_time.get(op, 0.0) for op in ops) for name, ops in OP_FAMILIES.items()}
    families["everything else (elementwise, LayerNorm, GELU, copies, ...)"] = total - sum(families.values())
    cfg = model.config
    nonembedding = model_utils.count_parameters(model, embeddings=False)
    padded_flops = sum(len(b) * training_flops(int(lengths[b].max()), cfg, nonembedding) for b in batches[1:])
    real_flops = sum(training_flops(int(lengths[i]), cfg, nonembedding) for b in batches[1:] for i in b)
    peak = matmul_peak() / 1e9  # GFLOP/s
    print(f"\n{header(args)}\nprofile of {steps} training steps of our loop (batches {[len(b) for b in batches[1:]]} rows, "
          f"{[int(lengths[b].max()) for b in batches[1:]]} tokens): {wall:.1f} s, {wall / steps:.2f} s per step; "
          f"matmul peak {peak:.1f} GFLOP/s\n\n| operators | share of CPU time | seconds per step |\n|---|---|---|")
    for name, seconds in families.items():
        print(f"| {name} | {seconds / total:.1%} | {seconds / steps:.2f} |")
    matmul_time = families["matmuls (mm, addmm, bmm)"] * wall / total
    print(f"\nmatmuls alone run at {padded_flops / matmul_time / 1e9:.1f} GFLOP/s ({padded_flops / matmul_time / 1e9 / peak:.0%} "
          f"of peak, counting padded tokens); the whole step at {real_flops / wall / 1e9:.1f} GFLOP/s of useful work "
          f"(MFU {real_flops / wall / 1e9 / peak:.0%}). If everything but matmuls took no time, MFU would be "
          f"{real_flops / matmul_time / 1e9 / peak:.0%}.")


if __name__ == "__main__":
    arguments = parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: ../shared/... is relative to it
    with exit_on_usage_error():  # a wrong --model or --data: one line, exit 2
        if arguments.variant:
            child_main(arguments)
        else:
            {"compare": compare, "knobs": knobs, "tokenize": tokenize, "profile": profile}[arguments.what](arguments)
