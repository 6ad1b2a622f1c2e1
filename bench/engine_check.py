"""The GPU check's engine runs: FSDP2 and DeepSpeed ZeRO-2 through `accelerate launch` with the
shipped configs, on the check's bert-base-sized model (bench/gpu_check.py make).

For each engine: a run of --steps steps that saves halfway, a second run resumed from that
checkpoint, and then the checks: every logged loss finite, the resumed run's logs and final
weights equal to the uninterrupted run's, and the saved model loaded by `pipeline()` and
classifying. bench/gpu_check.sh calls it; by hand:

    python bench/engine_check.py --out /tmp/gpu-check.XXXX --config configs/fsdp2_bf16.yaml --steps 40
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(config, out, work, steps, batch, *extra, cpu=False):
    """train_loop.py under `accelerate launch --config_file config`, one process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
               *(["--mixed_precision", "no"] if cpu else []), "train_loop.py",
               "--model_name_or_path", f"{work}/bert-base",
               "--dataset_name", f"train={work}/train.csv,test={work}/test.csv",
               "--per_device_train_batch_size", str(batch), "--max_length", "512", "--max_steps", str(steps),
               "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(steps // 2),
               "--eval_strategy", "no", "--report_to", "none", "--plots", "false",
               "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs", "--final_model_dir", f"{out}/model",
               *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{os.path.basename(config)}: train_loop.py failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def records(out):
    with open(f"{out}/results/log_history.jsonl") as f:
        return [json.loads(line) for line in f]


def steps_after(out, step):
    timing = ("_runtime", "_samples_per_second", "_steps_per_second")  # train_ and eval_: wall-clock
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in records(out) if r["step"] > step]


def largest_difference(a_dir, b_dir):
    a, b = load_file(f"{a_dir}/model.safetensors"), load_file(f"{b_dir}/model.safetensors")
    assert a.keys() == b.keys(), "the two saved models hold different tensors"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check(config, work, steps, batch, cpu):
    name = os.path.basename(config).removesuffix(".yaml")
    straight, resumed = f"{work}/{name}-straight", f"{work}/{name}-resumed"
    for folder in (straight, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    banner = launch(config, straight, work, steps, batch, cpu=cpu)
    engine = next(line.strip() for line in banner.splitlines() if line.strip().startswith("engine "))
    losses = [r["loss"] for r in records(straight) if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), f"{name}: a loss is not finite: {losses}"
    half = steps // 2
    os.makedirs(f"{resumed}/results")
    shutil.copytree(f"{straight}/results/checkpoint-{half}", f"{resumed}/results/checkpoint-{half}")
    launch(config, resumed, work, steps, batch, "--resume_from_checkpoint", "latest", cpu=cpu)
    same_logs = steps_after(resumed, half) == steps_after(straight, half)
    difference = largest_difference(straight + "/model", resumed + "/model")
    from transformers import pipeline

    answer = pipeline("text-classification", model=f"{straight}/model", device=0 if torch.cuda.is_available() else -1)(
        "w1 w5 w9")[0]
    print(f"{name}: {engine}")
    print(f"  {len(losses)} finite losses, first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(f"  resumed at step {half}: logs {'equal' if same_logs else 'DIFFERENT'}, final weights differ by at most {difference:.3g}")
    print(f"  pipeline() loads the saved model: {answer['label']} {answer['score']:.3f}")
    assert same_logs and difference <= 1e-6, f"{name}: the resumed run differs from the straight one"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder bench/gpu_check.py make wrote")
    parser.add_argument("--config", action="append", required=True, help="an accelerate config file (repeatable)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="fp32 on a CPU: the smoke run")
    args = parser.parse_args()
    for config in args.config:
        check(config, args.out, args.steps, args.batch, args.cpu)


if __name__ == "__main__":
    main()
