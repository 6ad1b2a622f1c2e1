"""Fine-tune a pretrained BERT for sentiment classification with an explicit training loop.

What `transformers.Trainer` does for the classic "BERT on IMDb" tutorial, written out so every
step can be read: forward, backward, gradient clipping, AdamW, a linear learning-rate schedule,
evaluation each epoch, checkpoints you can resume from. Accelerate runs the same code on CPU,
one GPU or many, in fp32, fp16 or bf16.

    accelerate config                              # once: CPU / GPUs, fp16 / bf16
    accelerate launch train_loop.py                # bert-base-uncased on imdb, the seed's settings
    python train_loop.py --model_name_or_path ../shared/models/minilm-l6 \
        --dataset_name ../shared/data/imdb --max_train_samples 2000 --max_eval_samples 1000
                                                   # a quick single-process run from local copies
    accelerate launch --mixed_precision bf16 train_loop.py     # bf16 autocast
    accelerate launch --multi_gpu --num_processes 2 train_loop.py
    python train_loop.py config.json               # every flag can come from a JSON or YAML file
    python train_loop.py --resume_from_checkpoint latest       # continue an interrupted run
    python train_loop.py --no_group_by_length      # plain shuffled batches (grouping by length is the default)
    python train_loop.py ... --log_layer_grad_norms --profile_steps 4   # study mode: see docs/study.md

On a CPU, dropout masks come from a faster generator and freed memory is kept for reuse (same math,
training/cpu_speed.py, BENCHMARKS.md): the banner's "not stock" lines say so, each with its off switch.

This file is the loop and nothing else, top-down: setup (`build`, the one path inspect_model.py and
the tests use too), the optimizer, the run, the loop (`train_one_epoch`), evaluation, main. What it
calls has a room each in training/: config.py (TrainConfig, the flags and their checks), engines.py
(accelerator, DeepSpeed, FSDP, compile, and what each engine does differently in a step),
checkpoints.py, faults.py (signals, NaN/inf steps, output folders) and runlog.py (logs, banner).
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import data
import model_utils
import plots
from training import checkpoints, cpu_speed, engines, faults, metrics, model_card, runlog, study
from training.checkpoints import Progress
from training.config import TrainConfig, data_seed, parse_config, scheduler_kwargs
from training.errors import exit_on_usage_error, require


# -----------------------------------------------------------------------------
# setup: data, tokenizer and model, the one path for training, inspect_model.py and the tests


@dataclass
class Setup:
    """What training is built from: `build(cfg)` makes it for training, inspect_model.py and the tests."""

    accelerator: Accelerator
    tokenizer: object
    model: torch.nn.Module  # not yet prepared (wrapped for the device and processes)
    label_names: list[str]
    train_ds: object  # tokenized datasets; eval_ds is None without an --eval_split
    eval_ds: object
    train_dl: DataLoader  # not yet prepared; eval_dl is None without an --eval_split
    eval_dl: Optional[DataLoader]
    speedups: list[str]  # what is not stock PyTorch/transformers (training/cpu_speed.py), each with its off switch


def build(cfg, wrap_collator=None):
    """cfg -> accelerator, data, tokenizer, model and loaders: the one setup path.

    Data is checked before any model is downloaded. The model gets --attn_implementation and, when
    it will train on a CPU, the CPU speed-ups, so whoever calls this sees the model training runs.
    wrap_collator: a function of the padding collator returning the one the loaders use instead
    (the training benchmark counts padded tokens this way).
    """
    faults.require_writable_dirs(cfg)  # a typo'd or read-only path fails now, not after hours of training
    accelerator = engines.build_accelerator(cfg)  # devices, processes, precision: `accelerate config`
    set_seed(cfg.seed)  # the same seed on every process: identical initial heads and dropout streams
    splits, label_names = data.load_for_training(cfg)  # checked and subset before any model downloads
    tokenizer = model_utils.load_tokenizer(cfg.model_name_or_path)
    train_ds, eval_ds = data.tokenize_splits(cfg, splits, label_names, tokenizer, accelerator)
    model = model_utils.load_model(cfg.model_name_or_path, label_names, cfg.attn_implementation)
    require(cfg.max_length <= model.config.max_position_embeddings,
            f"--max_length {cfg.max_length} exceeds the model's {model.config.max_position_embeddings} positions.")
    if cfg.activation_checkpointing:  # recompute each layer's activations in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speedups = []
    if cfg.do_train and accelerator.device.type == "cpu":
        speedups = cpu_speed.speed_up_training(cfg, model, accelerator)
    collator = data.build_collator(tokenizer, accelerator.mixed_precision)
    if wrap_collator is not None:
        collator = wrap_collator(collator)
    train_dl, eval_dl = data.build_dataloaders(
        train_ds, eval_ds, collator, cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size,
        data_seed(cfg), cfg.dataloader_num_workers, cfg.group_by_length, accelerator.num_processes,
        pin_memory=engines.pins_memory(cfg, accelerator.device),
    )
    return Setup(accelerator, tokenizer, model, label_names, train_ds, eval_ds, train_dl, eval_dl, speedups)


# -----------------------------------------------------------------------------
# optimizer, schedule, and the run: everything prepared for the device and processes


def build_optimizer(model, cfg, device=None):
    groups = model_utils.optimizer_param_groups(model, cfg.weight_decay)  # no decay on biases and LayerNorm
    # fused: one kernel for all parameters instead of ~10 per tensor, much faster (Trainer's default too)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=engines.fused_adamw(cfg, device))


def schedule_lengths(cfg, num_batches):
    """(steps per epoch, total optimizer steps, warm-up steps, epochs to run) from the prepared loader."""
    per_epoch = data.steps_per_epoch(num_batches, cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    warmup = math.ceil(cfg.warmup_steps * total) if cfg.warmup_steps < 1 else int(cfg.warmup_steps)
    return per_epoch, total, warmup, math.ceil(total / per_epoch)


@dataclass
class Run:
    """Everything the loop touches, built once by `start_run`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dl: object
    eval_dl: object
    tokenizer: object
    num_labels: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_epochs: int
    log: runlog.RunLog  # one record per event: the console, log_history.jsonl, TensorBoard
    progress: Progress  # what a checkpoint carries besides weights and RNG
    guard: faults.NonfiniteGuard  # NaN/inf steps: flagged on the device, skipped, read in batches
    window: runlog.LogWindow  # the steps since the last log line: their losses, read when needed
    overflow: engines.OverflowCheck  # fp16: whether the grad scaler skipped the step just taken
    stop_request: faults.StopRequest  # signals, agreed on by every process
    speedups: list[str] = field(default_factory=list)  # for the banner (training/cpu_speed.py)
    stop_reason: Optional[str] = None  # set when early stopping ends the run
    last_saved_step: Optional[int] = None
    last_eval: Optional[dict] = None
    layer_log: Optional[study.LayerLog] = None  # --log_layer_grad_norms
    profiler: Optional[study.StepProfiler] = None  # --profile_steps
    step_hooks: list = field(default_factory=list)  # called with the Run after each step (bench/gpu_check.py's clock)

    @property
    def global_batch(self):
        """Rows per optimizer step, all processes together."""
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps * self.accelerator.num_processes


def start_run(cfg, setup):
    """AdamW, the learning-rate schedule and everything prepared for the device and processes; the
    checkpoint loaded when resuming; the logs. Returns the Run the loop works on."""
    accelerator = setup.accelerator
    engines.require_real_fp16(accelerator)
    optimizer = build_optimizer(setup.model, cfg, accelerator.device)
    # Lengths come from the prepared loader: with N processes each sees 1/N of the batches.
    model, optimizer, train_dl = accelerator.prepare(setup.model, optimizer, setup.train_dl)
    eval_dl = accelerator.prepare(setup.eval_dl) if setup.eval_dl is not None else None
    steps_per_epoch, total_steps, warmup, num_epochs = schedule_lengths(cfg, len(train_dl))
    lr_scheduler = engines.prepare_schedule(accelerator, get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        scheduler_specific_kwargs=scheduler_kwargs(cfg),
    ))
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
    faults.require_shared_output_dir(accelerator, cfg.output_dir)
    resume = cfg.resume_from_checkpoint
    progress = checkpoints.load_checkpoint(accelerator, cfg, resume) if resume else Progress()
    resumed_step = progress.global_step if resume else None  # the logs drop what came after it
    log, guard = runlog.start(accelerator, cfg, resumed_step), faults.NonfiniteGuard(cfg, accelerator)
    window = runlog.LogWindow(cfg, log, progress, guard, steps_per_epoch, fp16=accelerator.scaler is not None)
    run = Run(cfg, accelerator, model, optimizer, lr_scheduler, train_dl, eval_dl, setup.tokenizer,
              len(setup.label_names), steps_per_epoch, total_steps, warmup, num_epochs, log, progress, guard, window,
              engines.OverflowCheck(accelerator), faults.StopRequest(accelerator), setup.speedups)
    run.layer_log, run.profiler = study.tools(cfg, accelerator, model, resumed_step)  # study mode, if asked
    return run


# -----------------------------------------------------------------------------
# the loop


def train(run):
    """Epochs until total_steps; returns the train summary."""
    start = time.perf_counter()
    first_step = run.progress.global_step
    pbar = tqdm(total=run.total_steps, initial=first_step, disable=not run.accelerator.is_local_main_process)
    if run.cfg.eval_on_start and first_step == 0 and run.eval_dl is not None:
        run_evaluation(run, compare=False)  # the untrained head's metrics, logged at step 0
    with run.stop_request:  # SIGTERM, SIGINT, SIGUSR1: stop at the next step boundary
        for epoch in range(first_step // run.steps_per_epoch, run.num_epochs):
            train_one_epoch(run, epoch, pbar)
            if run.progress.global_step % run.steps_per_epoch == 0 or run.progress.global_step == run.total_steps:
                end_of_epoch(run, pbar)
            if run.stop_reason:
                break
            stop_if_asked(run)
    pbar.close()
    if run.stop_reason:
        run.accelerator.print(f"{run.stop_reason}; stopped at step {run.progress.global_step:,}.")
    run.window.read()
    return runlog.train_summary(run.progress, time.perf_counter() - start, run.progress.global_step - first_step,
                                run.global_batch, run.steps_per_epoch, fp16=run.accelerator.scaler is not None)


def train_one_epoch(run, epoch, pbar):
    """One pass over the training batches (fewer if resuming mid-epoch or reaching max_steps)."""
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    rows = engines.RowMean(accelerator, model, cfg.gradient_accumulation_steps, len(run.train_dl))
    model.train()
    batches = checkpoints.epoch_batches(run, epoch)  # less those a resumed run has trained on
    for index, batch in enumerate(batches, start=checkpoints.batches_done(run, epoch)):  # index: this epoch's
        with accelerator.accumulate(model):
            outputs = model(**batch)  # forward: logits (B, num_labels) and the batch-mean cross-entropy
            loss = outputs.loss if not cfg.label_smoothing_factor else smoothed_loss(outputs.logits, batch, cfg)
            rows.backward(loss, len(batch["labels"]), index)  # backward of the rows' summed loss (DeepSpeed: + its step)
            if accelerator.sync_gradients:  # the last micro-batch of this step: update the weights
                step_loss = rows.step_mean()  # gradient and loss become means over the step's rows, all processes'
                watch = study.LayerWatch(model, accelerator) if layer_stats_due(run) else None  # --log_layer_grad_norms
                # The L2 norm of all gradients together, before clipping to max_grad_norm (DeepSpeed: its engine's)
                grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf),
                                            device=accelerator.device)
                nonfinite = run.guard.check(run.progress.global_step + 1, step_loss, grad_norm)  # NaN or inf?
                # AdamW: w -= lr * (m / (sqrt(v) + eps) + weight_decay * w); a NaN/inf step leaves w as it is
                run.guard.step_unless_nonfinite(optimizer, nonfinite)
                learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
                if run.overflow.skipped():  # fp16: inf/nan gradients, the grad scaler skipped the update
                    run.progress.skipped_steps += 1
                else:  # the schedule advances with the weights only, as in Trainer
                    run.lr_scheduler.step()
                optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step was taken: count it, then log / evaluate / save
            run.progress.global_step += 1
            after_step(run, torch.where(nonfinite.bool(), 0.0, step_loss), grad_norm, learning_rate, pbar, watch)
            if run.progress.global_step >= run.total_steps or run.stop_reason:
                break
            if run.progress.global_step % run.steps_per_epoch:  # an epoch's last step: train() checks after it
                stop_if_asked(run)


def smoothed_loss(logits, batch, cfg):
    """--label_smoothing_factor e: the cross-entropy against (1 - e) on the true class plus e spread
    over all classes, which is what Trainer's LabelSmoother computes."""
    return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=cfg.label_smoothing_factor)


def layer_stats_due(run):
    """--log_layer_grad_norms, on the coming step if it logs (study.LayerLog.due)."""
    return run.layer_log is not None and run.layer_log.due(run.progress.global_step + 1)


# -----------------------------------------------------------------------------
# after each step: the loss sums, the log line, evaluation, checkpoints, stop signals


def after_step(run, step_loss, grad_norm, learning_rate, pbar, watch=None):
    """Book-keeping once optimizer step `global_step` is done: the loss sums, and the log / eval /
    save that fall due on it."""
    cfg, progress = run.cfg, run.progress
    run.window.add(step_loss, grad_norm, learning_rate)
    pbar.update(1)
    if run.window.due(progress.global_step):
        run.window.write_line(pbar)  # {'loss': ..., 'grad_norm': ..., 'learning_rate': ..., 'epoch': ...}
        if watch is not None:
            run.layer_log.write(watch, progress.global_step)
    step, last = progress.global_step, progress.global_step >= run.total_steps  # "steps" saves the last one too (Trainer 5)
    evaluate_and_save(run, cfg.eval_strategy == "steps" and (step % (cfg.eval_steps or cfg.logging_steps) == 0 or last),
                      cfg.save_strategy == "steps" and (step % cfg.save_steps == 0 or last))
    if run.profiler is not None:
        run.profiler.step()
    for hook in run.step_hooks:
        hook(run)


def end_of_epoch(run, pbar):
    cfg = run.cfg
    if cfg.logging_strategy == "epoch" and run.progress.window_steps:
        run.window.write_line(pbar)
    evaluate_and_save(run, cfg.eval_strategy == "epoch", cfg.save_strategy == "epoch")


def evaluate_and_save(run, evaluate_now, save_now):
    """The evaluation and the checkpoint that fall due; --save_strategy best saves whenever the
    evaluation is the best so far."""
    if evaluate_now:
        run_evaluation(run)
    if save_now or run.cfg.save_strategy == "best" and evaluate_now and run.last_eval["new_best"]:
        checkpoint(run)


def run_evaluation(run, compare=True):
    """Evaluate, log, and (compare=True) hold the result against the best so far: --load_best_model_at_end,
    --save_strategy best and early stopping all read it."""
    results, confusion, _ = evaluate(run.model, run.eval_dl, run.accelerator, run.num_labels,
                                     run.cfg.label_smoothing_factor)
    results["epoch"] = round(run.progress.global_step / run.steps_per_epoch, 2)
    run.log.write(results, run.progress.global_step)
    new_best = False
    if compare and run.cfg.metric_for_best_model is not None:
        new_best, stop_reason = checkpoints.compare_with_best(run.cfg, run.progress, results)
        run.stop_reason = stop_reason or run.stop_reason  # early stopping
    run.last_eval = {"step": run.progress.global_step, "results": results, "confusion_matrix": confusion,
                     "new_best": new_best}


def checkpoint(run):
    run.window.read()  # the checkpoint's training_state.json carries the sums so far
    run.last_saved_step = run.progress.global_step
    if run.last_eval and run.last_eval["step"] == run.progress.global_step and run.last_eval["new_best"]:
        run.progress.best_checkpoint = checkpoints.checkpoint_path(run.cfg, run.progress.global_step)
    checkpoints.save_checkpoint(run.accelerator, run.cfg, run.progress, run.model, run.tokenizer,
                                model_card.for_run(run, step=run.progress.global_step))  # README.md


def stop_if_asked(run):
    """At a step boundary: if a stop signal came (to any process), save a checkpoint here and raise
    Stopped. Every process calls this at the same steps, and they agree on the answer, so all stop
    at the same step and the checkpoint is consistent."""
    name = run.stop_request.agreed()
    if name is not None:
        if run.cfg.enable_jit_checkpoint and run.last_saved_step != run.progress.global_step:
            checkpoint(run)  # the just-in-time checkpoint
        faults.stop(run.accelerator, run.cfg, name, run.progress.global_step, run.last_saved_step)


# -----------------------------------------------------------------------------
# evaluation, and the end: the final evaluation, pictures, the model for serving


def evaluate(model, dataloader, accelerator, num_labels, label_smoothing=0.0):
    """Loss and metrics over every evaluation row exactly once, whatever the number of processes;
    returns (results, confusion matrix, predictions in dataset order).

    Batches come longest first (data.LengthSortedSampler), so each pads to almost nothing; every
    row carries its number (`row`), which puts the predictions back in dataset order afterwards.
    `gather_for_metrics` concatenates the processes' rows and drops those accelerate repeated to
    give every process an equal number of batches.
    """
    model.eval()
    start = time.perf_counter()
    per_batch = []  # (rows, losses, predictions, labels) of each batch, all processes', kept on the device
    bar = tqdm(dataloader, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process)
    with torch.inference_mode():  # no autograd records at all: cheaper than no_grad
        for batch in bar:
            labels, row = batch.pop("labels"), batch.pop("row")
            logits = model(**batch).logits  # (B, num_labels)
            # (B,) one loss per row; with --label_smoothing_factor the smoothed loss, as Trainer reports it
            loss = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
            per_batch.append(accelerator.gather_for_metrics((row, loss, logits.argmax(dim=-1), labels)))
    # One copy to the host at the end: a copy per batch would make the CPU wait for the GPU each time.
    rows, row_losses, predictions, references = (torch.cat(columns).cpu() for columns in zip(*per_batch))
    model.train()
    runtime = time.perf_counter() - start
    if not torch.equal(rows.sort().values, torch.arange(len(rows))):  # each row once: what makes the order defined
        raise RuntimeError(f"evaluation saw rows {rows.tolist()[:20]}..., not each of 0..{len(rows) - 1} once")
    dataset_order = rows.argsort()
    predictions, references = predictions[dataset_order], references[dataset_order]
    results = {"eval_loss": row_losses.mean().item()}  # mean over rows, not over batches
    results |= metrics.evaluation_scores(predictions, references, num_labels)  # accuracy, f1, precision, recall
    results["eval_runtime"] = round(runtime, 4)
    results["eval_samples_per_second"] = round(len(references) / runtime, 3)
    results["eval_steps_per_second"] = round(len(dataloader) / runtime, 3)
    return results, metrics.confusion_matrix(predictions, references, num_labels), predictions


def finish(run, summary):
    """Train summary, final evaluation (the seed's `trainer.evaluate()`), and the model for serving."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.profiler is not None:
        run.profiler.close()  # a run shorter than the profiling window: save what was recorded
    run.log.write(summary, run.progress.global_step)
    final = None
    if cfg.load_best_model_at_end and run.progress.best_checkpoint:
        checkpoints.load_best_model(accelerator, cfg, run.progress, run.model)
        run_evaluation(run, compare=False)  # the final evaluation is the best model's
    if run.eval_dl is not None:
        if run.last_eval is None or run.last_eval["step"] != run.progress.global_step:
            run_evaluation(run)  # no evaluation at the last step yet: run one now
        final = runlog.report_evaluation(accelerator, cfg, run.last_eval["results"], run.last_eval["confusion_matrix"],
                                         num_rows=len(run.eval_dl.dataset))
    if cfg.plots and accelerator.is_main_process:
        written = plots.plot_run(cfg.output_dir, model_utils.label_names(accelerator.unwrap_model(run.model)))
        accelerator.print(f"wrote {', '.join(written)}")
    faults.require_finite_weights(accelerator, cfg, run.model)  # never publish a NaN model
    checkpoints.save_for_serving(accelerator, cfg, run.model, run.tokenizer, model_card.for_run(run))  # + README.md
    accelerator.end_training()
    return final


def evaluate_only(cfg, setup):
    """`--do_train False`: one evaluation of the given model, e.g. --model_name_or_path ./fine-tuned-bert."""
    accelerator = setup.accelerator
    model, eval_dl = accelerator.prepare(setup.model, setup.eval_dl)
    results, confusion, _ = evaluate(model, eval_dl, accelerator, len(setup.label_names), cfg.label_smoothing_factor)
    return runlog.report_evaluation(accelerator, cfg, results, confusion, num_rows=len(eval_dl.dataset))


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    """The command line: flags (or a config file) in, the final evaluation out."""
    with exit_on_usage_error():
        cfg = parse_config(argv)
        try:
            _, final = run_training(cfg)
        except faults.Stopped as stop:  # a signal: the checkpoint is saved and the line printed
            sys.exit(stop.exit_code)
        return final


def run_training(cfg, wrap_collator=None, step_hooks=()):
    """Setup, the loop, the final evaluation and the model for serving: the whole run.

    Returns (the Run, the final evaluation); the Run is None with --do_train False. The benchmarks
    call this too, reading the Run afterwards. Their seams: wrap_collator (see `build`) and
    step_hooks, functions called with the Run after each optimizer step.
    """
    setup = build(cfg, wrap_collator)
    if not cfg.do_train:
        return None, evaluate_only(cfg, setup)
    run = start_run(cfg, setup)
    run.step_hooks = list(step_hooks)
    runlog.print_banner(run, len(setup.train_ds))
    summary = train(run)
    return run, finish(run, summary)


if __name__ == "__main__":
    main()
