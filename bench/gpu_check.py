"""GPU check of train_loop.py: a bert-base-sized BERT (random weights) on IMDb-shaped synthetic reviews.

Driven by bench/gpu_check.sh; nothing here needs network. Three commands:

    python bench/gpu_check.py make --out DIR          # random bert-base + WordPiece vocab, 25k/1k reviews
    accelerate launch --mixed_precision bf16 bench/gpu_check.py run --out DIR --precision bf16 --steps 300
    python bench/gpu_check.py report --out DIR        # the table, and a non-zero exit if a check failed

`run` trains through train_loop.run_training (the same code path as a real run), then records samples/s,
real tokens/s, MFU against a matmul peak in the run's precision timed in the same process, peak GPU memory, whether
every logged loss is finite, and under fp16 how the grad scaler behaved.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench.measure import matmul_peak, training_flops  # noqa: E402 (needs the root on sys.path)
from training.errors import exit_on_usage_error  # noqa: E402

WORDS = 30_000  # vocabulary of synthetic words, bert-base-uncased's size


def make(out, smoke=False):
    """A random bert-base (110M parameters) with a tokenizer over all 30,000 synthetic words, and
    IMDb-shaped reviews in which one word decides the label.

    smoke: a 2-layer, hidden-64 BERT and 400 short reviews, to try the whole script on a CPU.
    """
    import pandas as pd
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(f"{out}/bert-base", exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(WORDS)]
    # transformers 5 takes the vocabulary as `vocab=`; `vocab_file=` is silently ignored, which left
    # a 5-token tokenizer that made every word [UNK] (and the check's learning numbers meaningless).
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=512)
    assert len(tokenizer) == len(vocab), f"the tokenizer has {len(tokenizer)} tokens, not {len(vocab)}"
    tokenizer.save_pretrained(f"{out}/bert-base")
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if smoke else {}
    BertModel(BertConfig(vocab_size=len(vocab), **small)).save_pretrained(f"{out}/bert-base")  # default: bert-base
    rng = random.Random(0)
    for split, rows in (("train", 400), ("test", 100)) if smoke else (("train", 25_000), ("test", 1_000)):
        reviews = []
        for _ in range(rows):
            # IMDb's length spread: median ~175 words, a long tail past 512 tokens (smoke: ~20 words).
            n = max(8, min(1000, int(rng.lognormvariate(3.0, 0.5) if smoke else rng.lognormvariate(5.2, 0.7))))
            label = rng.random() < 0.5
            words = [f"w{rng.randrange(3, WORDS)}" for _ in range(n)]
            words[rng.randrange(n)] = "w1" if label else "w2"  # one word decides: a learnable signal
            reviews.append({"text": " ".join(words), "label": int(label)})
        pd.DataFrame(reviews).to_csv(f"{out}/{split}.csv", index=False)


# What each run's MFU is measured against: a matmul in the run's own number format.
PEAK_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_STEPS = 10  # not timed: allocator growth, cuBLAS/cuDNN autotuning, loader workers starting


class StepClock:
    """Times the steps after the first WARMUP_STEPS, reading the clock only after the GPU has
    finished what was queued (kernels run asynchronously: without a sync, the clock stops early)."""

    def __init__(self):
        self.start = self.end = None
        self.first_step = None

    def __call__(self, run):
        if self.first_step is None:
            self.first_step = run.progress.global_step - 1
            self.warmup = min(WARMUP_STEPS, (run.total_steps - self.first_step) // 2)  # short smoke runs
        done = run.progress.global_step - self.first_step
        if done == self.warmup or run.progress.global_step == run.total_steps:
            synchronize()
            now = time.perf_counter()
            if done == self.warmup:
                self.start, self.start_step = now, run.progress.global_step
            else:
                self.end, self.end_step = now, run.progress.global_step

    def steps_per_second(self):
        if self.start is None or self.end is None:
            return math.nan
        return (self.end_step - self.start_step) / (self.end - self.start)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args):
    """Train through train_loop.run_training (the path a real run takes), keep the Run, report."""
    import data
    import model_utils
    import train_loop
    from training import engines

    # MFU against a matmul peak in the run's own precision, timed in this process (nan: a CPU smoke run).
    if torch.cuda.is_available():
        engines.set_tf32(args.precision == "tf32", torch.device("cuda"))  # the peak in the run's format
        peak = matmul_peak("cuda", PEAK_DTYPES[args.precision], size=8192, trials=1)
        torch.cuda.reset_peak_memory_stats()
    else:
        peak = math.nan
    steps = ["--num_train_epochs", "1"] if args.full_epoch else ["--max_steps", str(args.steps)]
    out = f"{args.out}/run-{args.precision}{'-epoch' if args.full_epoch else ''}"
    cfg = train_loop.parse_config([
        "--model_name_or_path", f"{args.out}/bert-base",
        "--dataset_name", f"train={args.out}/train.csv,test={args.out}/test.csv",
        "--per_device_train_batch_size", str(args.batch), "--per_device_eval_batch_size", "128",
        "--max_length", "512", *steps, "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1",
        "--logging_steps", str(max(1, min(25, args.steps // 4))), "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--dataloader_num_workers", str(args.workers), "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs",
        "--final_model_dir", f"{out}/model", *(["--tf32", "true"] if args.precision == "tf32" else []),
    ])
    clock = StepClock()
    run_, final = train_loop.run_training(cfg, step_hooks=[clock])  # the Run keeps the scaler and the data
    if not run_.accelerator.is_main_process:
        return
    with open(f"{out}/results/log_history.jsonl") as f:
        records = [json.loads(line) for line in f]
    summary = next(r for r in records if "train_runtime" in r)
    losses = [r["loss"] for r in records if "loss" in r]
    # Collation runs in the loader's worker processes, so tokens are counted from the data instead:
    # the rows are a random draw, so a step's tokens average those of the whole training set.
    lengths = data.token_lengths(run_.train_dl.dataset).double()
    epoch = data.length_grouped_batches(lengths, args.batch, 1, torch.Generator().manual_seed(0))
    padded = sum(len(b) * lengths[b].max().item() for b in epoch)
    model = run_.accelerator.unwrap_model(run_.model)
    nonembedding = model_utils.count_parameters(model, embeddings=False)
    mean_flops = training_flops(lengths, model.config, nonembedding).mean().item()
    rate = clock.steps_per_second() * run_.global_batch  # samples/s after the warm-up steps
    if not math.isfinite(rate):  # a run too short to leave out a warm-up
        rate = summary["train_samples_per_second"]
    report = {
        "precision": args.precision, "steps": run_.progress.global_step, "batch": args.batch,
        "samples/s": rate, "real tokens/s": rate * lengths.mean().item(),
        "padded share": 1 - lengths.sum().item() / padded, "MFU": rate * mean_flops / peak,
        "matmul peak TFLOP/s": peak / 1e12,
        "peak GPU GiB": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "25k-review epoch s (est.)": 25_000 / rate,
        "first/last loss": [losses[0], losses[-1]], "eval accuracy": final["eval_accuracy"],
        "losses finite": all(math.isfinite(x) for x in losses),
        "skipped steps": run_.progress.skipped_steps,  # fp16: steps with inf/nan gradients
        "fp16 scale": run_.accelerator.scaler.get_scale() if run_.accelerator.scaler is not None else None,
        "full epoch": args.full_epoch, "train_runtime": summary["train_runtime"],
    }
    with open(f"{args.out}/report.jsonl", "a") as f:
        f.write(json.dumps(report) + "\n")
    print(report)
    return report


def checks(r):
    """What must hold for a run to pass; an empty list when it does."""
    failed = [] if r["losses finite"] else ["a logged loss is inf/nan"]
    if r["precision"] == "fp16":  # the scaler skips a few steps while it finds its scale, then settles
        if not (r["fp16 scale"] and 1.0 <= r["fp16 scale"] < 2**24):
            failed.append(f"fp16 scale {r['fp16 scale']} outside [1, 2^24)")
        if r["skipped steps"] > max(10, 0.05 * r["steps"]):
            failed.append(f"fp16 skipped {r['skipped steps']} of {r['steps']} steps")
    elif r["skipped steps"]:
        failed.append(f"{r['skipped steps']} steps skipped without fp16")
    return failed


def report(out):
    with open(f"{out}/report.jsonl") as f:
        rows = [json.loads(line) for line in f]
    columns = ["samples/s", "real tokens/s", "padded share", "MFU", "matmul peak TFLOP/s", "peak GPU GiB", "eval accuracy",
               "25k-review epoch s (est.)", "skipped steps", "fp16 scale", "first/last loss"]
    print("| run | " + " | ".join(columns) + " | checks |\n" + "|---" * (len(columns) + 2) + "|")
    failures = 0
    for r in rows:
        failed = checks(r)
        failures += bool(failed)
        name = f"{r['precision']} {'full epoch' if r['full epoch'] else str(r['steps']) + ' steps'} (batch {r['batch']})"
        cells = [f"{r[c]:.1%}" if "share" in c or "MFU" in c else f"{r[c]:.3f}" if "accuracy" in c else
                 f"{r[c]:,.1f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(failed) or 'ok'} |")
    print(f"samples/s: after the first {WARMUP_STEPS} steps (not timed), clock read after torch.cuda.synchronize(). "
          "MFU: model FLOPs per second over the matmul peak timed in the run's own precision and process.")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["make", "run", "report"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", choices=list(PEAK_DTYPES), default="bf16",
                        help="tf32: fp32 with --tf32 true (launch it with --mixed_precision no)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--workers", type=int, default=4, help="data loader worker processes")
    parser.add_argument("--full_epoch", action="store_true", help="one pass over all 25k reviews instead of --steps")
    parser.add_argument("--smoke", action="store_true", help="make: a tiny model and 400 short reviews (CPU try-out)")
    arguments = parser.parse_args()
    with exit_on_usage_error():
        {"make": lambda a: make(a.out, a.smoke), "run": run, "report": lambda a: report(a.out)}[arguments.command](arguments)
