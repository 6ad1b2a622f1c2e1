"""What the loop's fault checks cost: the checkpoint manifest (written at each save, verified by
--resume_from_checkpoint) and the per-step NaN/inf check, measured on MiniLM-L6, our CPU stand-in
for bert-base.

    python -m bench.fault_checks                 # MiniLM-L6 from ../shared, 3 repeats
    python -m bench.fault_checks --repeats 5

One short real run (train_loop.run_training, 2 steps, a checkpoint at each) gives a real
checkpoint: model, AdamW's moments, schedule, random state. Then, side by side in this process:
a whole checkpoint save, writing its manifest, and verifying it; and the NaN/inf guard's per-step
check (training/faults.py) against the same step without it.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

import train_loop
from training import checkpoints

PROG = "python -m bench.fault_checks"


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_run(out, model, data):
    cfg = train_loop.parse_config([
        "--model_name_or_path", model, "--dataset_name", data, "--max_train_samples", "16", "--max_eval_samples", "16", "--max_length", "128",
        "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
        "--report_to", "none", "--plots", "false", "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs",
        "--final_model_dir", f"{out}/model",
    ])
    run, _ = train_loop.run_training(cfg)
    return run


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def check_cost(run, steps):
    """Seconds per step of the NaN/inf guard's device work on this run's optimizer, as the loop does it."""
    loss, norm = torch.tensor(0.69), torch.tensor(1.5)

    def checks():
        for _ in range(steps):
            flag = run.guard.check(run.progress.global_step + 1, loss, norm)
            if run.guard.skip == "device":  # the flag step_unless_nonfinite hands the fused AdamW
                run.optimizer.optimizer.found_inf = flag
                del run.optimizer.optimizer.found_inf
        run.guard.read(run.progress)

    checks()  # warm-up
    return median_seconds(checks, 3) / steps


def main():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="../shared/models/minilm-l6")
    parser.add_argument("--data", default="../shared/data/imdb")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        run = real_run(out, args.model, args.data)
        checkpoint = checkpoints.checkpoint_path(run.cfg, run.progress.global_step)
        size = folder_bytes(checkpoint)
        save = median_seconds(lambda: train_loop.checkpoint(run), args.repeats)
        write = median_seconds(lambda: checkpoints.write_manifest(checkpoint), args.repeats)
        verify = median_seconds(lambda: checkpoints.checkpoint_damage(checkpoint), args.repeats)
        per_step = check_cost(run, 2000)
    print(f"\ncheckpoint of {size / 1e6:,.0f} MB ({run.cfg.model_name_or_path}), median of {args.repeats}\n")
    print("| what | seconds | share of a save |\n|---|---|---|")
    print(f"| whole checkpoint save (manifest included) | {save:.3f} | 100% |")
    print(f"| writing the manifest (sha256 of every file) | {write:.3f} | {write / save:.0%} |")
    print(f"| verifying it (--resume_from_checkpoint) | {verify:.3f} | {verify / save:.0%} |")
    print(f"\nper-step NaN/inf check (NonfiniteGuard.check, device skip: {run.guard.skip}): {per_step * 1e6:.1f} µs per step")


if __name__ == "__main__":
    main()
