"""What a run tells its reader: the banner before the first step, one record per event to the
console, output_dir/log_history.jsonl and accelerate's trackers (TensorBoard by default), the
seed's log line, and the final evaluation as the seed's `trainer.evaluate()` printed it.
"""

import dataclasses
import json
import math
import os
import socket
from datetime import datetime

from tqdm.auto import tqdm

import model_utils
from training import engines, hardware
from training.checkpoints import saved_train_config, write_json


# -----------------------------------------------------------------------------
# records: the console, log_history.jsonl, the trackers


class JsonLines:
    """A JSON-lines file of records that each carry a "step"; only the main process writes.

    A fresh run starts it empty. A resumed one first drops the records an interrupted run wrote
    after its last checkpoint: the resumed run writes them again.
    """

    def __init__(self, accelerator, path, resumed_step=None):
        self.path = path
        self.writes = accelerator.is_main_process
        if self.writes and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if resumed_step is not None and json.loads(line)["step"] <= resumed_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def append(self, record):
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class RunLog:
    """One record per event, three sinks: the console, log_history.jsonl, and accelerate's trackers."""

    def __init__(self, accelerator, jsonl):
        self.accelerator = accelerator
        self.jsonl = jsonl

    def write(self, record, step):
        if self.accelerator.is_main_process:
            tqdm.write(str(record))
        self.jsonl.append({"step": step, **record})
        self.accelerator.log(tracker_names(record), step=step)


def tracker_names(record):
    """loss -> train/loss, eval_accuracy -> eval/accuracy: TensorBoard groups charts by prefix."""
    named = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            named[key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"] = value
    return named


def log_record(progress, grad_norm, learning_rate, steps_per_epoch):
    """The seed's log line: mean loss over the window, pre-clip norm and rate of the last step, epoch."""
    finite_steps = progress.window_steps - progress.window_nonfinite  # NaN/inf steps are left out
    return {
        "loss": round(progress.window_loss / finite_steps, 4) if finite_steps else math.nan,
        "grad_norm": float(f"{grad_norm:.4g}"),
        "learning_rate": float(f"{learning_rate:.4g}"),
        "epoch": round(progress.global_step / steps_per_epoch, 2),
    }


class LogWindow:
    """The steps since the last log line: their losses summed on the device and read by the host
    only where a log line or a checkpoint needs the numbers (reading a device value makes the host
    wait for the device; Trainer keeps its tr_loss on the device the same way); then the seed's line.

    The sums read land in `progress` as plain floats, so a checkpoint carries them; `guard`'s
    NaN/inf flags of the same steps are read in the same wait (faults.NonfiniteGuard).
    """

    def __init__(self, cfg, log, progress, guard, steps_per_epoch, fp16):
        self.cfg, self.log, self.progress, self.guard = cfg, log, progress, guard
        self.steps_per_epoch, self.fp16 = steps_per_epoch, fp16
        self.unread_loss = None  # finite step losses summed on the device since progress last read them
        self.last_step = None  # the last step's grad_norm and learning_rate, for the next log line

    def add(self, step_loss, grad_norm, learning_rate):
        """Optimizer step `progress.global_step` is done: its loss joins the sum, still on the device."""
        self.unread_loss = step_loss if self.unread_loss is None else self.unread_loss + step_loss
        self.progress.window_steps += 1
        self.last_step = {"grad_norm": grad_norm, "learning_rate": learning_rate}
        if self.guard.due():  # a diverged run stops within a few steps of its limit
            self.read()

    def due(self, step):
        """--logging_strategy steps: every --logging_steps; --logging_first_step: step 1 too (Trainer's rules)."""
        cfg = self.cfg
        return (cfg.logging_strategy == "steps" and step % cfg.logging_steps == 0) or (cfg.logging_first_step and step == 1)

    def read(self):
        """Add the step losses summed on the device to progress's plain floats, and read the NaN/inf flags."""
        if self.unread_loss is not None:
            loss = float(self.unread_loss)
            self.progress.window_loss += loss
            self.progress.total_loss += loss
            self.unread_loss = None
        self.guard.read(self.progress)

    def write_line(self, pbar):
        """The seed's log line for the steps since the last one."""
        progress = self.progress
        self.read()
        record = log_record(progress, float(self.last_step["grad_norm"]), self.last_step["learning_rate"],
                            self.steps_per_epoch)
        if self.fp16 or progress.skipped_steps:  # fp16's overflows, NaN/inf steps so far
            record["skipped_steps"] = progress.skipped_steps
        self.log.write(record, progress.global_step)
        pbar.set_postfix(loss=record["loss"])
        progress.window_loss, progress.window_steps, progress.window_nonfinite = 0.0, 0, 0


def start(accelerator, cfg, resumed_step=None):
    """The run's RunLog: its trackers started under --run_name (a resumed run keeps its own; TensorBoard:
    logging_dir/<run_name>) and log_history.jsonl, less what came after `resumed_step`."""
    cfg.run_name = cfg.run_name or resumed_run_name(cfg) or default_run_name()
    accelerator.init_trackers(cfg.run_name, config=trackable(cfg))
    return RunLog(accelerator, JsonLines(accelerator, os.path.join(cfg.output_dir, "log_history.jsonl"), resumed_step))


def train_summary(progress, runtime, steps, global_batch, steps_per_epoch, fp16):
    """The record after the last step, as Trainer's train() returns it: `steps` took `runtime` seconds."""
    return {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps * global_batch / runtime, 3),
        "train_steps_per_second": round(steps / runtime, 3),
        "train_loss": progress.total_loss / max(1, progress.global_step - progress.nonfinite_steps),
        "epoch": round(progress.global_step / steps_per_epoch, 2),
    } | ({"skipped_steps": progress.skipped_steps} if fp16 else {})


# -----------------------------------------------------------------------------
# the banner, the final evaluation


def print_banner(run, num_train_rows):
    """The derived numbers, once, and everything that is not stock PyTorch/transformers. `run`:
    train_loop's Run (its cfg, accelerator, model, optimizer, lengths, speed-ups and progress)."""
    cfg, acc = run.cfg, run.accelerator
    model = acc.unwrap_model(run.model)
    lines = [
        "***** training *****",
        f"  examples {num_train_rows:,} | processes {acc.num_processes} | device {acc.device} | "
        f"precision {acc.mixed_precision}",
        f"  batch per device {cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps}"
        f" x processes {acc.num_processes} = {run.global_batch} rows per optimizer step",
        f"  steps per epoch {run.steps_per_epoch:,} | total steps {run.total_steps:,} | warm-up steps {run.warmup_steps:,}",
        f"  engine {engines.engine_line(acc)}",
        f"  optimizer {engines.optimizer_line(run.optimizer, cfg)}",
        f"  model {type(model).__name__}, {model_utils.count_parameters(model):,} parameters, "
        f"attention {model.config._attn_implementation}, {engines.compile_line(cfg)}",
    ]
    if acc.device.type == "cuda":
        lines.append(f"  GPU {model_utils.device_name(acc.device)} | fp32 matmuls {engines.fp32_matmul_line()}")
    if acc.device.type == "cpu":
        lines.append(f"  CPU {hardware.training_line(acc.mixed_precision)}")
    lines += [f"  not stock: {speedup}" for speedup in run.speedups] or ["  not stock: nothing"]
    if run.progress.global_step:
        lines.append(f"  resuming at step {run.progress.global_step:,}")
    acc.print("\n".join(lines))


def report_evaluation(accelerator, cfg, results, confusion_matrix, num_rows):
    """Print the results as the seed's `trainer.evaluate()` did; keep them in output_dir/eval_results.json."""
    accelerator.print(results)
    final = {**results, "eval_samples": num_rows, "confusion_matrix": confusion_matrix}
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, "eval_results.json"), final)
    return final


# -----------------------------------------------------------------------------
# the run's name and settings, for the trackers


def default_run_name():
    """As Trainer names runs: month, day, time and host, plus milliseconds, so two runs never share one."""
    now = datetime.now()
    return f"{now:%b%d_%H-%M-%S}.{now.microsecond // 1000:03d}_{socket.gethostname()}"


def resumed_run_name(cfg):
    """A resumed run continues its own TensorBoard run (checkpoints written before run names had none)."""
    return saved_train_config(cfg.resume_from_checkpoint).get("run_name") if cfg.resume_from_checkpoint else None


def trackable(cfg):
    """TensorBoard's hparams take numbers, strings and booleans only."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
