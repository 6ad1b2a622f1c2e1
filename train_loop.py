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

On a CPU, training is not quite stock: cpu_speed.py draws dropout masks with a faster generator
and keeps freed memory for reuse (same math, measured in BENCHMARKS.md). The banner's "not stock"
lines say what is in effect; --fast_dropout false and --reuse_cpu_memory false turn each off.
Stepping through `model(**batch)` in a debugger, each attention layer then calls
cpu_speed.attention_with_fast_dropout.

The file reads top-down: config, setup (`build`, the one path inspect_model.py and the tests use
too), progress and logging, evaluation, checkpoints, the loop (`train_one_epoch`), main.
"""

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from accelerate import Accelerator
from accelerate.utils import (OPTIMIZER_NAME, SCALER_NAME, DataLoaderConfiguration, DistributedType, LoggerType,
                               broadcast_object_list, set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, SchedulerType, get_scheduler
from transformers.utils.import_utils import enable_tf32, is_torch_tf32_available

import cpu_speed
import data
import model_utils
import plots
import study
from errors import RunFailed, UsageError, exit_on_usage_error
from metrics import ClassificationMetrics


# -----------------------------------------------------------------------------
# config: TrainingArguments' names and the seed's values, so Trainer users type what they know


def flag(default, help, **kwargs):
    """A config field with its --help text (TrainingArguments' name unless the text says otherwise)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str = flag("bert-base-uncased", "Hub id or local folder of the pretrained model")
    dataset_name: str = flag("imdb", "Hub id, local folder, or data files: a.csv | train=a.csv,test=b.csv")
    train_split: str = flag("train", 'split to train on; slices work: "train[:90%%]"')
    eval_split: Optional[str] = flag("test", 'split to evaluate on; "" for none')
    text_column: str = flag("text", "column holding the review text")
    label_column: str = flag("label", "column holding the label (class names or integers)")
    max_length: int = flag(512, "tokens kept per review; BERT's limit is 512")
    max_train_samples: Optional[int] = flag(None, "a seeded random subset of the training split (cheap runs)")
    max_eval_samples: Optional[int] = flag(None, "a seeded random subset of the evaluation split")
    # where things land
    output_dir: str = flag("./results", "checkpoints, logs as JSON lines, eval results")
    logging_dir: str = flag("./logs", "TensorBoard event files, one folder per run (--run_name)")
    run_name: Optional[str] = flag(None, "the run's name: its TensorBoard folder under logging_dir. Default: "
                                         "date, time and host, as Trainer's; a resumed run keeps its own")
    final_model_dir: str = flag("./fine-tuned-bert", "model + tokenizer for serving (not a Trainer flag)")
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": (
        "accelerate trackers: tensorboard (the default), wandb, mlflow, ..., all or none; several as a list "
        "or comma-separated")})
    # optimisation: the seed's values, else Trainer's defaults
    num_train_epochs: float = flag(3.0, "passes over the training data (fractions allowed)")
    max_steps: int = flag(-1, "if > 0: total optimizer steps, overrides --num_train_epochs")
    per_device_train_batch_size: int = flag(8, "training rows per batch, per process")
    per_device_eval_batch_size: int = flag(8, "evaluation rows per batch, per process")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step; the step's gradient is "
                                               "the mean over all their rows")
    learning_rate: float = flag(5e-5, "AdamW's peak learning rate")
    weight_decay: float = flag(0.01, "AdamW's decoupled weight decay, not on biases/LayerNorm (Trainer: 0)")
    adam_beta1: float = flag(0.9, "AdamW's beta1")
    adam_beta2: float = flag(0.999, "AdamW's beta2")
    adam_epsilon: float = flag(1e-8, "AdamW's epsilon")
    optim: Literal["adamw_torch_fused", "adamw_torch"] = flag(
        "adamw_torch_fused", "AdamW as one fused kernel for all parameters (Trainer's default), or torch's loop")
    lr_scheduler_type: str = flag("linear", "linear, cosine, constant, constant_with_warmup, polynomial, ...")
    lr_scheduler_kwargs: Optional[str] = flag(None, 'extra schedule arguments as JSON, e.g. \'{"num_cycles": 2}\'')
    warmup_steps: float = flag(0, "steps of linear warm-up; a float < 1 is a fraction of all steps")
    max_grad_norm: float = flag(1.0, "clip the total gradient norm; 0 = no clipping")
    max_nonfinite_steps: int = flag(5, "a step whose loss or gradient norm is NaN/inf is skipped (the weights "
                                       "do not move); this many in a row stop the run (not a Trainer flag)")
    label_smoothing_factor: float = flag(0.0, "label smoothing of the cross-entropy (0: none)")
    activation_checkpointing: bool = flag(False, "recompute activations in the backward pass: less memory, "
                                                 "about a third more compute")
    gradient_checkpointing: Optional[bool] = flag(None, "old name of --activation_checkpointing, still accepted")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = flag(
        None, "accelerate's name for the precision; unset: what `accelerate config` chose")
    bf16: bool = flag(False, "Trainer's flag: the same as --mixed_precision bf16")
    fp16: bool = flag(False, "Trainer's flag: the same as --mixed_precision fp16 (GPUs only)")
    tf32: Optional[bool] = flag(None, "TF32 tensor cores for fp32 matmuls on Ampere and newer GPUs; unset: "
                                      "torch's default, full fp32. The banner says which")
    seed: int = flag(42, "seed of the head's initialisation, dropout and the subsets")
    data_seed: Optional[int] = flag(None, "seed of the training batches' order; default: --seed")
    # the data loader
    dataloader_num_workers: int = flag(0, "processes collating batches beside the training process")
    dataloader_pin_memory: bool = flag(True, "on CUDA: batches in pinned host memory, copied to the GPU "
                                             "without blocking the CPU")
    # speed: each default measured on CPU, see BENCHMARKS.md
    group_by_length: bool = flag(True, (
        "batch reviews of similar length (seeded, resumable); Trainer 5: --train_sampling_strategy "
        "group_by_length. On by default, unlike Trainer: IMDb lengths spread from ~10 to 512 tokens, so "
        "random batches are largely padding, grouped ones almost none (BENCHMARKS.md)"))
    train_sampling_strategy: Optional[Literal["random", "group_by_length"]] = flag(
        None, "Trainer 5's name for --group_by_length: random is --group_by_length false")
    attn_implementation: Optional[Literal["sdpa", "eager"]] = flag(
        None, "attention kernel; unset: the model's default (sdpa). from_pretrained's argument")
    torch_compile: Optional[bool] = flag(None, (
        "torch.compile the model. Unset: what `accelerate config` answered (its dynamo backend); true or "
        "false overrides that. The banner says which. On CPU, recompiling for new lengths cost minutes and "
        "did not pay back (BENCHMARKS.md)"))
    torch_compile_backend: Optional[str] = flag(None, "torch.compile backend (inductor, eager, ...); "
                                                      "setting it turns --torch_compile on")
    fast_dropout: bool = flag(True, (
        "CPU training only (not a Trainer flag): draw dropout masks from numpy's PCG64, seeded from torch's "
        "generator, instead of torch's bernoulli_: the same Bernoulli masks, drawn several times faster "
        "(cpu_speed.py). Off on GPU and under torch.compile"))
    reuse_cpu_memory: bool = flag(True, (
        "CPU training only (not a Trainer flag): glibc keeps freed tensor memory for the next step instead "
        "of mapping fresh zero-filled pages for every large tensor (cpu_speed.py)"))
    # logging, evaluation, checkpoints
    logging_strategy: Literal["steps", "epoch", "no"] = flag("steps", "when to write a log line")
    logging_steps: int = flag(500, "optimizer steps between log lines")
    logging_first_step: bool = flag(False, "also log step 1: the loss of the untrained head, near ln 2")
    eval_strategy: Literal["no", "steps", "epoch"] = flag("epoch", "when to evaluate (Trainer: no)")
    eval_steps: Optional[int] = flag(None, "with --eval_strategy steps; default --logging_steps")
    eval_on_start: bool = flag(False, "evaluate once before the first step")
    save_strategy: Literal["no", "steps", "epoch", "best"] = flag(
        "epoch", "when to save a checkpoint; best: whenever --metric_for_best_model improves (Trainer: steps)")
    save_steps: int = flag(500, "with --save_strategy steps")
    save_total_limit: Optional[int] = flag(None, "keep only the newest N checkpoints (and the best one)")
    save_only_model: bool = flag(False, "checkpoints hold the model only, no optimizer state: smaller, "
                                        "but cannot be resumed")
    load_best_model_at_end: bool = flag(False, "end with the best checkpoint's model: it is saved for "
                                               "serving and evaluated last")
    metric_for_best_model: Optional[str] = flag(None, "what best means: loss, accuracy, f1, ... (an eval_ "
                                                      "key, with or without the prefix); default loss")
    greater_is_better: Optional[bool] = flag(None, "default: true unless the metric is a loss")
    early_stopping_patience: Optional[int] = flag(None, "stop after this many evaluations without improvement "
                                                        "of --metric_for_best_model (Trainer's EarlyStoppingCallback)")
    early_stopping_threshold: float = flag(0.0, "how much better than the best an evaluation must be to count")
    resume_from_checkpoint: Optional[str] = flag(None, "a checkpoint folder, or latest")
    enable_jit_checkpoint: bool = flag(True, "on SIGTERM, SIGINT or SIGUSR1: finish the step, save a checkpoint, "
                                             "exit (Trainer 5's flag; on by default here)")
    do_train: bool = flag(True, "False: only evaluate --model_name_or_path")
    evaluation_strategy: Optional[str] = flag(None, "old name of --eval_strategy (removed in transformers 5), "
                                                    "still accepted")
    # study mode (study.py, plots.py): off unless asked for, and then no extra work on other steps
    log_layer_grad_norms: bool = flag(False, "per-layer grad norms and update/weight ratios at each logging "
                                             "step, to TensorBoard and output_dir/layer_stats.jsonl")
    profile_steps: int = flag(0, "torch.profiler over this many steps after 3 warm-up steps; trace in "
                                 "logging_dir/profile, summary printed")
    plots: bool = flag(True, "training_curves.png and confusion_matrix.png in output_dir")


# Changing these between a checkpoint and its resume would change which rows each step sees.
RESUME_MUST_MATCH = ("dataset_name", "train_split", "max_train_samples", "max_length", "seed", "data_seed",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes",
                     "group_by_length")


def parse_config(argv=None):
    """Flags, or one JSON/YAML file; then validate, before anything heavy happens."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            (cfg,) = parser.parse_json_file(argv[0], allow_extra_keys=False)
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            (cfg,) = parser.parse_yaml_file(argv[0], allow_extra_keys=False)
        else:
            cfg, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
            require(not unknown, unknown_flags_message(unknown, parser))
    except ValueError as err:
        raise UsageError(f"{err}. Run `python train_loop.py --help` for every flag.") from None
    except FileNotFoundError as err:
        raise UsageError(f"config file not found: {err.filename}") from None
    return validate_config(cfg)


def build_parser():
    parser = HfArgumentParser(TrainConfig, allow_abbrev=False)  # a typo must not silently match a flag
    for action in parser._actions:  # HfArgumentParser gives each --no_X the help of --X
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"the same as --{action.option_strings[0][5:]} false"
    return parser


def unknown_flags_message(unknown, parser):
    """Which arguments are not flags, each with the closest flag that is (the values after them are left out)."""
    flags = [option for action in parser._actions for option in action.option_strings]
    parts = []
    for i, arg in enumerate(unknown):
        if not arg.startswith("-") and i > 0 and unknown[i - 1].startswith("-"):
            continue  # the value of the unknown flag before it
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6) if name.startswith("--") else []
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return (f"unknown argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}. "
            "Run `python train_loop.py --help` for every flag.")


def validate_config(cfg):
    if cfg.evaluation_strategy is not None:
        print("note: --evaluation_strategy is the old name of --eval_strategy; using it as such.")
        cfg.eval_strategy, cfg.evaluation_strategy = cfg.evaluation_strategy, None
    if cfg.gradient_checkpointing is not None:
        print("note: --gradient_checkpointing is the old name of --activation_checkpointing; using it as such.")
        cfg.activation_checkpointing, cfg.gradient_checkpointing = cfg.gradient_checkpointing, None
    if cfg.train_sampling_strategy is not None:  # Trainer 5's spelling of our --group_by_length
        cfg.group_by_length, cfg.train_sampling_strategy = cfg.train_sampling_strategy == "group_by_length", None
    cfg.mixed_precision = precision_from_trainer_flags(cfg)
    cfg.report_to = trackers(cfg.report_to)
    cfg.eval_split = cfg.eval_split or None
    for f in dataclasses.fields(cfg):  # Literal choices, also for values from JSON/YAML files
        choices = [c for c in typing.get_args(f.type) if isinstance(c, str)] if "Literal" in str(f.type) else []
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise UsageError(f"--{f.name} must be one of {choices}, not {value!r}.")
    require(cfg.lr_scheduler_type in [s.value for s in SchedulerType],
            f"--lr_scheduler_type {cfg.lr_scheduler_type!r} is unknown; use one of {[s.value for s in SchedulerType]}.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "logging_steps", "save_steps", "max_length"):
        require(getattr(cfg, name) >= 1, f"--{name} must be a positive integer, not {getattr(cfg, name)}.")
    for name in ("max_train_samples", "max_eval_samples", "eval_steps", "save_total_limit"):
        value = getattr(cfg, name)
        require(value is None or value >= 1, f"--{name} must be a positive integer, not {value}.")
    require(cfg.learning_rate > 0, f"--learning_rate must be positive, not {cfg.learning_rate}.")
    require(cfg.weight_decay >= 0 and cfg.max_grad_norm >= 0 and cfg.adam_epsilon > 0,
            "--weight_decay and --max_grad_norm must be >= 0, --adam_epsilon > 0.")
    require(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "--adam_beta1/2 must lie in [0, 1).")
    require(cfg.warmup_steps >= 0 and (cfg.warmup_steps < 1 or float(cfg.warmup_steps).is_integer()),
            f"--warmup_steps must be a whole number of steps or a fraction below 1, not {cfg.warmup_steps}.")
    require(cfg.max_steps > 0 or cfg.num_train_epochs > 0,
            "set --num_train_epochs > 0 or --max_steps > 0: there is nothing to train otherwise.")
    require(cfg.do_train or cfg.eval_split, "--do_train False evaluates only, so it needs an --eval_split.")
    require(cfg.eval_split is not None or cfg.eval_strategy == "no",
            "--eval_split is empty, so there is nothing to evaluate on: also pass --eval_strategy no.")
    require(cfg.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0.")
    require(cfg.profile_steps >= 0, f"--profile_steps must be >= 0 (0: no profiling), not {cfg.profile_steps}.")
    require(0 <= cfg.label_smoothing_factor < 1, f"--label_smoothing_factor must lie in [0, 1), not {cfg.label_smoothing_factor}.")
    scheduler_kwargs(cfg)  # valid JSON
    validate_best_model(cfg)
    if cfg.resume_from_checkpoint:
        cfg.resume_from_checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    return cfg


def precision_from_trainer_flags(cfg):
    """Trainer's --bf16 / --fp16 are accelerate's --mixed_precision bf16 / fp16; one precision only."""
    require(not (cfg.bf16 and cfg.fp16), "--bf16 and --fp16 both set: choose one precision.")
    asked = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else None
    require(asked is None or cfg.mixed_precision in (None, asked),
            f"--{asked} contradicts --mixed_precision {cfg.mixed_precision}: set one of them.")
    return asked or cfg.mixed_precision


def trackers(report_to):
    """--report_to as a list of accelerate tracker names: a list, a comma list, "all" or "none"."""
    names = [n.strip() for item in ([report_to] if isinstance(report_to, str) else report_to or [])
             for n in item.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    known = [t.value for t in LoggerType]
    unknown = [n for n in names if n not in known]
    require(not unknown, f"--report_to {', '.join(unknown)}: unknown; use any of {known} or none.")
    return names


def scheduler_kwargs(cfg):
    """--lr_scheduler_kwargs as a dict (Trainer takes the same JSON)."""
    if not cfg.lr_scheduler_kwargs:
        return {}
    try:
        kwargs = json.loads(cfg.lr_scheduler_kwargs)
    except ValueError as err:
        raise UsageError(f"--lr_scheduler_kwargs is not valid JSON ({err}): write e.g. '{{\"num_cycles\": 2}}'.") from None
    require(isinstance(kwargs, dict), "--lr_scheduler_kwargs must be a JSON object, e.g. '{\"power\": 2.0}'.")
    return kwargs


BEST_MODEL_METRICS = ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall")


def validate_best_model(cfg):
    """--load_best_model_at_end, --save_strategy best and early stopping need evaluations, and a metric."""
    require(cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1,
            "--early_stopping_patience must be a positive number of evaluations.")
    wants_best = cfg.load_best_model_at_end or cfg.save_strategy == "best" or cfg.early_stopping_patience
    if not wants_best and cfg.metric_for_best_model is None:
        return
    require(not wants_best or cfg.eval_strategy != "no", "--load_best_model_at_end, --save_strategy best and "
                                       "--early_stopping_patience compare evaluations: set --eval_strategy steps or epoch.")
    metric = cfg.metric_for_best_model or "loss"
    cfg.metric_for_best_model = metric if metric.startswith("eval_") else f"eval_{metric}"
    require(cfg.metric_for_best_model in BEST_MODEL_METRICS,  # known now, not at the first evaluation
            f"--metric_for_best_model {metric!r} is not an evaluation result; use one of "
            f"{', '.join(m.removeprefix('eval_') for m in BEST_MODEL_METRICS)}.")
    if cfg.greater_is_better is None:
        cfg.greater_is_better = not cfg.metric_for_best_model.endswith("loss")
    if cfg.load_best_model_at_end and cfg.save_strategy != "best":  # Trainer's rule: the best must have been saved
        require(cfg.save_strategy == cfg.eval_strategy,
                f"--load_best_model_at_end needs a checkpoint at every evaluation: --save_strategy "
                f"{cfg.eval_strategy} (or best), not {cfg.save_strategy}.")
        require(cfg.eval_strategy != "steps" or cfg.save_steps % (cfg.eval_steps or cfg.logging_steps) == 0,
                "--load_best_model_at_end with steps: --save_steps must be a multiple of --eval_steps.")


def require(condition, message):
    if not condition:
        raise UsageError(message)


# -----------------------------------------------------------------------------
# setup


def build_accelerator(cfg):
    """Devices, processes and precision come from `accelerate config`/`accelerate launch`, or the flag."""
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # Every process shuffles with the same seed, so together they cover each row once per epoch.
            # non_blocking: host-to-GPU copies from pinned memory are queued, not waited for.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed(cfg),
                                                      non_blocking=cfg.dataloader_pin_memory),
            # We step the schedule once per optimizer step ourselves. Left linked, accelerate steps it
            # once per process per optimizer step, and a 2-process run would decay twice as fast.
            step_scheduler_with_optimizer=False,
            dynamo_backend=compile_backend(cfg) or "no",  # prepare() compiles the model; "no" overrides the env
            log_with=cfg.report_to or None,
            project_dir=cfg.logging_dir,
        )
    except ValueError as err:  # e.g. bf16 on a GPU without it, or a tracker that is not installed
        raise UsageError(f"cannot set up the accelerator (devices, precision, trackers): {err}") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # what torchrun (accelerate launch) started
    require(launched == accelerator.num_processes,
            f"{launched} processes were launched, but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value} on {accelerator.device}): each would train alone, on "
            "the same output folders. On a machine without a GPU, set ACCELERATE_USE_CPU=1 (see "
            "configs/cpu_two_processes.yaml); otherwise check the distributed_type of your accelerate config.")
    require_engine_as_configured(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes)
    set_tf32(cfg.tf32, accelerator.device)
    available = {str(getattr(tracker, "value", tracker)) for tracker in accelerator.log_with}
    missing = [name for name in cfg.report_to if name != "all" and name not in available]
    require(not missing, f"--report_to {', '.join(missing)}: not installed here, so nothing would be logged there. "
                         f"Install it (pip install {' '.join(missing)}) or leave it out of --report_to.")
    return accelerator


def require_engine_as_configured(accelerator):
    """The engine `accelerate config` chose, or a clear refusal: on a machine without a GPU (and with
    ACCELERATE_USE_CPU=1) accelerate quietly sets up plain DDP for an FSDP or DeepSpeed config."""
    for engine, variable in ((DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED"), (DistributedType.FSDP, "ACCELERATE_USE_FSDP")):
        asked = os.environ.get(variable, "false").lower() in ("1", "true")
        require(not asked or accelerator.distributed_type == engine,
                f"the accelerate config asks for {engine.value}, but accelerate set up {accelerator.distributed_type.value} "
                f"on {accelerator.device} ({accelerator.num_processes} processes): {engine.value} shards on GPUs. Run it on "
                f"GPUs, or pick a config without {engine.value} (configs/cpu_two_processes.yaml for CPU processes).")


def configure_deepspeed(ds_config, cfg, num_processes):
    """One source of truth: our flags. DeepSpeed's engine, not this loop, batches, accumulates and
    clips under DeepSpeed, from its own config; each of those numbers there is set from our flag
    when it is "auto" (or absent), and a number that disagrees with the flag is refused."""
    ours = {
        "train_micro_batch_size_per_gpu": ("--per_device_train_batch_size", cfg.per_device_train_batch_size),
        "gradient_accumulation_steps": ("--gradient_accumulation_steps", cfg.gradient_accumulation_steps),
        "train_batch_size": ("--per_device_train_batch_size x --gradient_accumulation_steps x processes",
                             cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes),
        "gradient_clipping": ("--max_grad_norm", cfg.max_grad_norm),  # 0 means no clipping in both
    }
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    require(stage != 3 or ds_config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"),
            "ZeRO-3 splits the weights, and checkpoints and the served model need them whole: set "
            "zero3_save_16bit_model: true in the accelerate config (configs/deepspeed_zero3_bf16.yaml does).")
    require(stage != 3 or not cfg.load_best_model_at_end,
            "--load_best_model_at_end loads the best checkpoint's weights into the model, which ZeRO-3 holds "
            "split across processes. Use ZeRO-2 (configs/deepspeed_zero2_bf16.yaml), or leave the flag out and "
            "serve the best checkpoint: each checkpoint is a model folder, its training_state.json holds best_metric.")
    require(not cfg.log_layer_grad_norms,
            "--log_layer_grad_norms reads each layer's gradients before the optimizer step, and under DeepSpeed "
            "the engine steps (and frees them) inside backward. Measure per-layer norms without DeepSpeed "
            "(one process, DDP or FSDP: configs/), or leave the flag out.")
    for key, (flag_name, value) in ours.items():
        theirs = ds_config.get(key, "auto")
        if theirs in ("auto", None):
            ds_config[key] = value
        elif float(theirs) != float(value):
            raise UsageError(
                f"the DeepSpeed config sets {key}: {theirs}, but {flag_name} is {value:g}. Under DeepSpeed the "
                f"engine applies {key} itself, so the two must agree: set {key}: auto in the DeepSpeed config "
                f"(this run then uses {flag_name}) or pass the same number to {flag_name}.")


def data_seed(cfg):
    """The seed of the training batches' order: --data_seed, else --seed (as in Trainer)."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def compile_backend(cfg):
    """The torch.compile backend, or None: one decision from --torch_compile / --torch_compile_backend
    and `accelerate config`'s dynamo answer (which `accelerate launch` passes as ACCELERATE_DYNAMO_BACKEND).
    A flag set on the command line wins; unset, accelerate config decides."""
    configured = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    configured = None if configured == "no" else configured
    if cfg.torch_compile is False:
        return None
    if cfg.torch_compile_backend:
        return cfg.torch_compile_backend
    if cfg.torch_compile:
        return configured or "inductor"
    return configured


def set_tf32(tf32, device):
    """--tf32 true/false sets TF32 for fp32 matmuls and convolutions (transformers' helper, as Trainer does);
    unset leaves torch's default. TF32 exists on NVIDIA Ampere and newer only."""
    if tf32 is None:
        return
    require(not tf32 or (device.type == "cuda" and is_torch_tf32_available()),
            f"--tf32 true needs an NVIDIA GPU of the Ampere generation or newer; this run is on {device}. "
            "Leave --tf32 unset (or false) here.")
    if is_torch_tf32_available():
        enable_tf32(tf32)  # the global fp32 precision; a backend set on its own before keeps its setting,
        mode = "tf32" if tf32 else "ieee"  # so both GPU backends are set too
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode


def load_data(cfg):
    """Raw splits, validated and subset, with the label names: all before any model is downloaded."""
    splits = data.load_splits(cfg.dataset_name, cfg.train_split, cfg.eval_split)
    label_names = data.validate(splits, cfg.text_column, cfg.label_column)
    limits = {"train": cfg.max_train_samples, "eval": cfg.max_eval_samples}
    splits = {role: data.take_subset(ds, limits[role], cfg.seed) for role, ds in splits.items()}
    if len(set(splits["train"][cfg.label_column])) < 2:
        raise UsageError(f"the {len(splits['train'])}-row training subset has one class only; take more rows.")
    return splits, label_names


def tokenize_data(cfg, splits, label_names, tokenizer, accelerator):
    """(train, eval or None), tokenized once by the main process, then read from the cache by all."""
    with accelerator.main_process_first():
        tokenized = {
            role: data.tokenize(ds, tokenizer, cfg.text_column, cfg.label_column, label_names, cfg.max_length)
            for role, ds in splits.items()
        }
    return tokenized["train"], tokenized.get("eval")


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
    speedups: list[str]  # what is not stock PyTorch/transformers (cpu_speed.py), each with its off switch


def build(cfg, wrap_collator=None):
    """cfg -> accelerator, data, tokenizer, model and loaders: the one setup path.

    Data is checked before any model is downloaded. The model gets --attn_implementation and, when
    it will train on a CPU, the CPU speed-ups, so whoever calls this sees the model training runs.
    wrap_collator: a function of the padding collator returning the one the loaders use instead
    (the training benchmark counts padded tokens this way).
    """
    require_writable_dirs(cfg)
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same seed on every process: identical initial heads and dropout streams
    splits, label_names = load_data(cfg)
    tokenizer = model_utils.load_tokenizer(cfg.model_name_or_path)
    train_ds, eval_ds = tokenize_data(cfg, splits, label_names, tokenizer, accelerator)
    model = model_utils.load_model(cfg.model_name_or_path, label_names, cfg.attn_implementation)
    require(cfg.max_length <= model.config.max_position_embeddings,
            f"--max_length {cfg.max_length} exceeds the model's {model.config.max_position_embeddings} positions.")
    if cfg.activation_checkpointing:  # recompute each layer's activations in the backward pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speedups = []
    if cfg.do_train and accelerator.device.type == "cpu":
        speedups = speed_up_cpu_training(cfg, model, accelerator)
    collator = data.build_collator(tokenizer, accelerator.mixed_precision)
    if wrap_collator is not None:
        collator = wrap_collator(collator)
    train_dl, eval_dl = data.build_dataloaders(
        train_ds, eval_ds, collator, cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size,
        data_seed(cfg), cfg.dataloader_num_workers, cfg.group_by_length, accelerator.num_processes,
        pin_memory=pins_memory(cfg, accelerator.device),
    )
    return Setup(accelerator, tokenizer, model, label_names, train_ds, eval_ds, train_dl, eval_dl, speedups)


def require_writable_dirs(cfg):
    """Every output folder can be created and written, checked before any model loads: a typo'd
    or read-only path fails now, not after hours of training."""
    for flag in ("output_dir", "logging_dir", "final_model_dir"):
        path = os.path.abspath(getattr(cfg, flag))
        existing = path
        while not os.path.exists(existing):  # the nearest part of the path that exists must be a folder
            existing = os.path.dirname(existing)
        require(os.path.isdir(existing), f"--{flag} {getattr(cfg, flag)!r}: {existing} is a file, not a folder, so "
                                         "nothing can be written below it. Choose another path.")
        require(os.access(existing, os.W_OK | os.X_OK), f"--{flag} {getattr(cfg, flag)!r}: {existing} is not "
                                                        "writable by this user. Choose a folder you can write to.")


def pins_memory(cfg, device):
    """--dataloader_pin_memory (on by default, as in Trainer), on CUDA only: page-locked batches are
    what lets the copy to the GPU run while the CPU goes on; elsewhere pinning would only cost."""
    return cfg.dataloader_pin_memory and device.type == "cuda"


def speed_up_cpu_training(cfg, model, accelerator):
    """cpu_speed.py's two CPU-only speed-ups, each measured in BENCHMARKS.md; a GPU needs neither.
    Returns what is in effect, for the banner: nothing non-stock happens without the run saying so."""
    speedups = []
    if cfg.fast_dropout and compile_backend(cfg):  # numpy inside forward() would split dynamo's graph
        accelerator.print("--fast_dropout is off under torch.compile: torch's own dropout is used.")
    elif cfg.fast_dropout:
        cpu_speed.use_fast_dropout(model)
        in_attention = model.config._attn_implementation == cpu_speed.ATTENTION_NAME
        where = "dropout layers and attention" if in_attention else "dropout layers"
        speedups.append(f"dropout masks from numpy's PCG64 in {where} (cpu_speed.py; off: --fast_dropout false)")
    if cfg.reuse_cpu_memory and cpu_speed.reuse_freed_memory():
        speedups.append("glibc keeps freed memory for reuse, process-wide (cpu_speed.py; off: --reuse_cpu_memory false)")
    elif cfg.reuse_cpu_memory:
        accelerator.print("--reuse_cpu_memory needs glibc's malloc (Linux); this C library keeps its own policy.")
    return speedups


def build_optimizer(model, cfg, device=None):
    groups = model_utils.optimizer_param_groups(model, cfg.weight_decay)
    # fused: one kernel for all parameters instead of ~10 per tensor, much faster (Trainer's default too)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, fused=cfg.optim == "adamw_torch_fused" and has_fused_adamw(device))


def has_fused_adamw(device):
    """Whether this torch has the fused AdamW kernel for `device` (None: the model's own, checked by
    torch itself). An Apple GPU (mps) has it from torch 2.4 on; where it does not, the plain AdamW
    runs and the banner says so (optimizer_line)."""
    if device is None:
        return True
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


def optimizer_line(optimizer, cfg):
    fused = optimizer.param_groups[0].get("fused")  # every wrapper (accelerate's, DeepSpeed's) shares the groups
    if fused:
        return "AdamW, fused: one kernel for all parameters"
    if cfg.optim == "adamw_torch_fused":
        return "AdamW, torch's per-tensor loop: this torch has no fused AdamW for this device"
    return "AdamW, torch's per-tensor loop (--optim adamw_torch)"


def schedule_lengths(cfg, num_batches):
    """(steps per epoch, total optimizer steps, warm-up steps, epochs to run) from the prepared loader."""
    per_epoch = data.steps_per_epoch(num_batches, cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * per_epoch)
    warmup = math.ceil(cfg.warmup_steps * total) if cfg.warmup_steps < 1 else int(cfg.warmup_steps)
    return per_epoch, total, warmup, math.ceil(total / per_epoch)


# -----------------------------------------------------------------------------
# progress and logging


@dataclass
class Progress:
    """What a checkpoint carries besides weights and RNG, so a resumed run logs what a straight one would."""

    global_step: int = 0  # optimizer steps done
    window_loss: float = 0.0  # sum of step losses since the last log line
    window_steps: int = 0
    window_nonfinite: int = 0  # of those, steps with a NaN/inf loss: not in window_loss
    total_loss: float = 0.0  # sum of all step losses, for train_loss
    skipped_steps: int = 0  # steps whose update was skipped: fp16's overflows, and NaN/inf steps
    nonfinite_steps: int = 0  # steps with a NaN/inf loss or gradient norm; their losses are left out of the sums
    nonfinite_in_row: int = 0  # the latest run of them: --max_nonfinite_steps in a row stop the run
    best_metric: Optional[float] = None  # --metric_for_best_model's best value so far
    best_checkpoint: Optional[str] = None  # the checkpoint saved at that evaluation
    evals_without_improvement: int = 0  # early stopping's count


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


# -----------------------------------------------------------------------------
# evaluation


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
    require_permutation(rows)
    dataset_order = rows.argsort()
    predictions, references = predictions[dataset_order], references[dataset_order]
    scores = ClassificationMetrics(keep_in_memory=True).compute(
        predictions=predictions.tolist(), references=references.tolist(), num_labels=num_labels
    )
    results = {"eval_loss": row_losses.mean().item()}  # mean over rows, not over batches
    results.update({f"eval_{name}": value for name, value in scores.items()})
    results["eval_runtime"] = round(runtime, 4)
    results["eval_samples_per_second"] = round(len(references) / runtime, 3)
    results["eval_steps_per_second"] = round(len(dataloader) / runtime, 3)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)  # rows: true class, columns: predicted
    confusion.index_put_((references, predictions), torch.ones_like(references), accumulate=True)
    return results, confusion.tolist(), predictions


def require_permutation(rows):
    """Each evaluation row exactly once: what makes dataset order (and the metrics) well defined."""
    if not torch.equal(rows.sort().values, torch.arange(len(rows))):
        raise RuntimeError(f"evaluation saw rows {rows.tolist()[:20]}..., not each of 0..{len(rows) - 1} once")


# -----------------------------------------------------------------------------
# checkpoints


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first. Saves in progress live under tmp-checkpoint-* and never match."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), m.group(0)) for m in map(CHECKPOINT_RE.match, os.listdir(output_dir)) if m]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(value, output_dir):
    """--resume_from_checkpoint: a folder, verified against its manifest; or latest, the newest intact
    checkpoint: a damaged one (a truncated copy, a lost file) is skipped with a note saying why."""
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        require(checkpoints, f"--resume_from_checkpoint latest: no checkpoint-* folder in {output_dir!r}.")
        for path in reversed(checkpoints):
            damage = checkpoint_damage(path)
            if damage is None:
                return path
            say(f"note: --resume_from_checkpoint latest skips {path}, which is damaged: {damage}.")
        raise UsageError(f"--resume_from_checkpoint latest: every checkpoint in {output_dir!r} is damaged (see the "
                         "notes above). Restore one from a copy, or start afresh without --resume_from_checkpoint.")
    require(os.path.isfile(os.path.join(value, "training_state.json")),
            f"--resume_from_checkpoint {value!r} is not a checkpoint folder (no training_state.json in it).")
    damage = checkpoint_damage(value)
    require(damage is None, f"--resume_from_checkpoint {value!r} is damaged: {damage}. Resume from another "
                            "checkpoint (latest picks the newest intact one) or restore this one from a copy.")
    return value


MANIFEST = "checkpoint_manifest.json"  # each file's size and sha256, written last, before the rename


def write_manifest(folder):
    """Record what a complete checkpoint holds. The files were just written, so reading them back
    comes from the page cache: about a second per GB (BENCHMARKS.md)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(set(names) - {MANIFEST}):
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    write_json(os.path.join(folder, MANIFEST), {"files": dict(sorted(files.items()))})


def checkpoint_damage(folder):
    """Why `folder` is not the checkpoint that was saved, in a few words; None if it is intact.
    Checkpoints written before manifests existed are taken as they are, with a note."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        say(f"note: {folder} has no {MANIFEST} (an older checkpoint): its files cannot be verified.")
        return None
    try:
        with open(path) as f:
            files = {name: (int(want["bytes"]), str(want["sha256"])) for name, want in json.load(f)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is not a manifest train_loop.py wrote"
    for name, (size, digest) in files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} holds {os.path.getsize(file):,} bytes, not the {size:,} it was saved with"
        if sha256_of(file) != digest:
            return f"{name} is not what was saved (its sha256 differs)"
    return None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def say(message):
    """Print once, also before accelerate is set up: on the process of rank 0 (every process on its own)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def save_checkpoint(accelerator, cfg, progress, model, tokenizer):
    """Model, optimizer, scheduler, RNG and scaler via `save_state`; progress and our settings as
    JSON; and the model's config and tokenizer, so that `from_pretrained` and `pipeline()` read the
    checkpoint as a model folder, as they read Trainer's.

    Written to tmp-checkpoint-N, completed by a manifest of each file's size and sha256, and renamed
    once complete: a crash mid-save leaves no folder that `--resume_from_checkpoint latest` could
    pick, and a checkpoint damaged later (an interrupted copy, a lost file) is known by its manifest.
    """
    final = checkpoint_path(cfg, progress.global_step)
    tmp = os.path.join(cfg.output_dir, f"tmp-checkpoint-{progress.global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier interrupted save
    accelerator.wait_for_everyone()
    # Each process writes its part, then all learn whether any failed: a process whose own part
    # was written must not wait forever for one that gave up (a full disk seen by one rank only).
    error = attempt(write_checkpoint, accelerator, cfg, progress, model, tokenizer, tmp)
    if not failed_anywhere(accelerator, error) and accelerator.is_main_process:
        error = attempt(write_manifest, tmp)  # every process's part is on disk: the manifest lists them
    if failed_anywhere(accelerator, error):
        accelerator.wait_for_everyone()
        free = shutil.disk_usage(cfg.output_dir).free
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(cfg.output_dir)
        what = model_utils.first_line(error) if error else "another process could not write its part (its message says why)"
        raise RunFailed(f"could not save checkpoint-{progress.global_step} into {cfg.output_dir} "
                        f"({free / 1024:,.0f} kB were free there when the save failed): {what}. "
                        f"The partial folder was removed; {'the newest complete checkpoint, ' + kept[-1] + ', is intact and resumes with --resume_from_checkpoint latest' if kept else 'no earlier checkpoint exists'}. "
                        "Free space (or choose another --output_dir), then resume.")
    accelerator.wait_for_everyone()  # the manifest on disk before the one rename that publishes it all
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        delete_old_checkpoints(cfg.output_dir, cfg.save_total_limit, keep=progress.best_checkpoint)
    accelerator.wait_for_everyone()


def attempt(write, *args):
    """Run a write; return the error of a full disk, a quota or a lost mount instead of raising it."""
    try:
        write(*args)
    except (OSError, RuntimeError, SafetensorError) as err:
        return err
    return None


def failed_anywhere(accelerator, error):
    """Whether any process got an error: a sum over processes, which is also a barrier."""
    if accelerator.num_processes == 1:
        return error is not None
    return bool(accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum"))


def write_checkpoint(accelerator, cfg, progress, model, tokenizer, tmp):
    if cfg.save_only_model:  # weights, config and tokenizer only: a model folder that cannot be resumed
        model_utils.save_for_serving(accelerator, model, tokenizer, tmp)
    else:
        accelerator.save_state(tmp)  # every process writes its part (its RNG state at least)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed's engine writes its own format (pytorch_model/): the weights as safetensors
            # beside it keep the checkpoint a model folder that from_pretrained and pipeline() open.
            state_dict = accelerator.get_state_dict(model)  # every process: ZeRO-3 gathers the shards
            if accelerator.is_main_process:
                model_utils.write_weights(accelerator, model, state_dict, tmp)
    if accelerator.is_main_process:
        write_json(os.path.join(tmp, "training_state.json"), dataclasses.asdict(progress))
        write_json(os.path.join(tmp, TRAIN_CONFIG), {**dataclasses.asdict(cfg), "num_processes": accelerator.num_processes,
                                                     "engine": checkpoint_format(accelerator)})
        accelerator.unwrap_model(model, keep_torch_compile=False).config.save_pretrained(tmp)  # config.json
        tokenizer.save_pretrained(tmp)


def checkpoint_path(cfg, step):
    return os.path.join(cfg.output_dir, f"checkpoint-{step}")


def delete_old_checkpoints(output_dir, limit, keep=None):
    """--save_total_limit N, Trainer's rule (its trainer_utils.rotate_checkpoints, the tests' oracle):
    N checkpoints stay, the best one among them. So the best and the newest N - 1 stay; with N = 1,
    the best and the newest."""
    if limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    if keep in checkpoints[:-1]:  # an older best counts as the second newest: it is kept
        checkpoints.remove(keep)
        checkpoints.insert(len(checkpoints) - 1, keep)
        limit = max(limit, 2)
    for path in checkpoints[:-limit]:
        shutil.rmtree(path)


TRAIN_CONFIG = "train_config.json"  # our settings; config.json is the model's, as in any model folder


def load_checkpoint(accelerator, cfg, path):
    saved = saved_train_config(path)
    current = {**dataclasses.asdict(cfg), "num_processes": accelerator.num_processes}
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in RESUME_MUST_MATCH if saved.get(k) != current[k]]
    require(not changed, f"cannot resume from {path!r}: these settings differ from the checkpoint's "
                         f"({'; '.join(changed)}). Resume with the original settings.")
    saved_format, now = saved.get("engine"), checkpoint_format(accelerator)  # absent in older checkpoints
    require(saved_format in (None, now) or "DEEPSPEED" not in saved_format + now,
            f"cannot resume from {path!r}: it was saved by {saved_format} and this run is {now}; DeepSpeed's "
            f"engine reads only its own checkpoints, of its own ZeRO stage. Resume with the accelerate config "
            f"that wrote it, or start a new run from its weights with --model_name_or_path {path}.")
    require(holds_training_state(path),
            f"cannot resume from {path!r}: it was saved with --save_only_model, so it holds no optimizer, "
            f"schedule or random state. Start a new run from its weights with --model_name_or_path {path}.")
    load_state_across_precisions(accelerator, path)
    with open(os.path.join(path, "training_state.json")) as f:
        return Progress(**json.load(f))


def checkpoint_format(accelerator):
    """Who writes a checkpoint's training state: DeepSpeed's engine (per ZeRO stage) or accelerate."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.distributed_type.value
    stage = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    return f"DEEPSPEED ZeRO-{stage}"


def holds_training_state(path):
    """Whether `path` holds AdamW's state: optimizer.bin (one process, DDP, FSDP's full state dict),
    optimizer_0/ (FSDP's sharded state dict) or DeepSpeed's engine checkpoint (its `latest` tag)."""
    return any(os.path.exists(os.path.join(path, name)) for name in (OPTIMIZER_NAME + ".bin", OPTIMIZER_NAME + "_0", "latest"))


def saved_train_config(path):
    """A checkpoint's settings: train_config.json, or config.json in checkpoints written before the
    checkpoints became model folders (that file then holds our settings, not the model's)."""
    for name in (TRAIN_CONFIG, "config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                saved = json.load(f)
            if "model_name_or_path" in saved:
                return saved
    raise UsageError(f"cannot resume from {path!r}: it has no {TRAIN_CONFIG} (nor an older config.json with "
                     "the training settings). Resume from a checkpoint written by train_loop.py.")


def load_state_across_precisions(accelerator, path):
    """`load_state`, also when the precision changed since the save (moving to another GPU, say).

    The weights, AdamW's moments and the schedule are fp32 under every precision, so they carry over
    as they are; only fp16 has a loss scaler (scaler.pt). Resuming in fp16 from an fp32/bf16
    checkpoint starts a fresh scaler, and the other way round the saved one is not needed.
    """
    has_scaler = os.path.isfile(os.path.join(path, SCALER_NAME))
    if accelerator.scaler is None or has_scaler:
        if has_scaler and accelerator.scaler is None:
            accelerator.print(f"note: {path} was saved under fp16; this run ({accelerator.mixed_precision}) "
                              f"needs no loss scaler, so its {SCALER_NAME} is not used.")
        accelerator.load_state(path)
        return
    require(not accelerator.is_fsdp2, f"cannot resume fp16 under FSDP from {path!r}, saved without fp16: "
                                      "resume in the checkpoint's precision.")
    accelerator.print(f"note: {path} was saved without fp16 (no {SCALER_NAME}); this fp16 run starts a fresh "
                      f"loss scaler at scale {accelerator.scaler.get_scale():g}.")
    scaler, accelerator.scaler = accelerator.scaler, None  # load_state would read scaler.pt from the folder
    try:
        accelerator.load_state(path)
    finally:
        accelerator.scaler = scaler





def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# -----------------------------------------------------------------------------
# the loop


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
    log: RunLog
    progress: Progress
    speedups: list[str] = field(default_factory=list)  # for the banner (cpu_speed.py)
    unread_loss: Optional[torch.Tensor] = None  # finite step losses summed on the device since progress last read them
    unread_checks: list = field(default_factory=list)  # per step since: (step, NaN/inf flag, loss, grad_norm) on the device
    nonfinite_skip: str = "device"  # how a NaN/inf step's update is skipped: see nonfinite_skip()
    loss_scale: Optional[float] = None  # fp16: the grad scaler's scale after the last step
    last_step: Optional[dict] = None  # the last step's grad_norm and learning_rate, for the next log line
    stop_reason: Optional[str] = None  # set when early stopping ends the run
    stop_request: Optional["StopRequest"] = None  # signals, agreed on by every process
    last_saved_step: Optional[int] = None
    last_eval: Optional[dict] = None
    layer_log: Optional[study.LayerLog] = None  # --log_layer_grad_norms
    profiler: Optional[study.StepProfiler] = None  # --profile_steps
    step_hooks: list = field(default_factory=list)  # called with the Run after each step (bench/gpu_check.py's clock)

    @property
    def deepspeed(self):
        """DeepSpeed's engine batches, clips and steps itself (configure_deepspeed ties it to our flags)."""
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def global_batch(self):
        """Rows per optimizer step, all processes together."""
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps * self.accelerator.num_processes


def train_one_epoch(run, epoch, pbar):
    """One pass over the training batches (fewer if resuming mid-epoch or reaching max_steps)."""
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    batches = epoch_batches(run, epoch)
    model.train()
    loss_sum, rows = 0.0, 0  # this step's micro-batches so far: the sum of their rows' losses, their rows
    for index, batch in enumerate(batches, start=batches_done(run, epoch)):  # index: this epoch's micro-batch
        with accelerator.accumulate(model):
            outputs = model(**batch)  # forward: logits (B, num_labels) and the batch-mean cross-entropy
            loss = outputs.loss if not cfg.label_smoothing_factor else smoothed_loss(outputs.logits, batch, cfg)
            batch_rows = len(batch["labels"])
            # backward of the rows' summed loss: grads += d(sum of row losses / accumulation steps)/dw.
            # The step divides by the rows it really holds, so each row weighs the same however many
            # micro-batches (and rows) its window has: an epoch's last window may be short.
            # DeepSpeed's engine steps inside the backward of the step's last micro-batch, before we could
            # divide by rows: it gets each micro-batch's mean loss over the micro-batches of its window.
            if not run.deepspeed:
                accelerator.backward(loss * batch_rows)
            else:
                accelerator.backward(loss / window_batches(run, index), scale_wrt_gas=False)
            loss_sum += loss.detach() * batch_rows
            rows += batch_rows
            if accelerator.sync_gradients:  # the last micro-batch of this step: update the weights
                window_rows = accelerator.reduce(torch.tensor(float(rows), device=accelerator.device), "sum")
                if not run.deepspeed:
                    mean_over_rows(model, accelerator, window_rows)  # the step's gradient: a mean over its rows
                # --log_layer_grad_norms on a logging step: per-layer norms before clipping, weights before the step
                watch = study.LayerWatch(model, accelerator) if layer_stats_due(run) else None
                # The total L2 norm of all gradients, measured before clipping rescales them to max_grad_norm
                # (under DeepSpeed: the norm the engine measured, then clipped by, in the step it just took).
                grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf),
                                            device=accelerator.device)
                # The mean loss over this step's rows, all processes together: the same on every process.
                step_loss = accelerator.reduce(loss_sum, reduction="sum") / window_rows
                nonfinite = check_finite(run, step_loss, grad_norm)  # NaN or inf: skip this update
                if not (run.nonfinite_skip == "host" and bool(nonfinite)):  # "host": one device sync
                    optimizer.step()  # AdamW: w -= lr * (m / (sqrt(v) + eps) + weight_decay * w)
                optimizer.optimizer.__dict__.pop("found_inf", None)
                learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step used
                if overflowed(run):  # fp16: inf/nan gradients, the update was skipped
                    run.progress.skipped_steps += 1
                else:  # the schedule advances with the weights only, as in Trainer
                    run.lr_scheduler.step()
                optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step was taken: count it, then log / evaluate / save
            run.progress.global_step += 1
            after_step(run, torch.where(nonfinite.bool(), 0.0, step_loss), grad_norm, learning_rate, pbar, watch)
            loss_sum, rows = 0.0, 0
            if run.progress.global_step >= run.total_steps or run.stop_reason:
                break
            if run.progress.global_step % run.steps_per_epoch:  # an epoch's last step: train() checks after it
                stop_if_asked(run)


def check_finite(run, step_loss, grad_norm):
    """Whether this step's loss or gradient norm is NaN or inf, as a 0-dim float on the device; and
    if so, make the coming optimizer step leave the weights alone.

    One NaN gradient makes the total norm NaN, so the norm that clipping computed anyway checks every
    gradient at once. The host reads the flags later, with the losses (see read_checks).
    """
    finite = torch.isfinite(step_loss)
    if run.nonfinite_skip != "count":
        finite &= torch.isfinite(grad_norm)
    nonfinite = (~finite).float()
    if run.nonfinite_skip == "device":
        # The fused AdamW takes the flag fp16's grad scaler hands it: where it is 1 the kernel leaves
        # weights, moments and its step count as they were. Nothing waits for the GPU.
        run.optimizer.optimizer.found_inf = nonfinite
    run.unread_checks.append((run.progress.global_step + 1, nonfinite, step_loss, grad_norm))
    return nonfinite


READ_CHECKS_EVERY = 32  # steps: a diverged run stops within this many of its limit, at one device sync each


def nonfinite_skip(cfg, accelerator):
    """How a NaN/inf step is skipped. "device": by the fused AdamW, with no device sync. "host": by not
    calling step(), which reads the flag (one sync per step): torch's unfused AdamW takes no flag, and
    FSDP's sharded parameters are left to plain step() calls. "count": fp16's grad scaler already skips
    overflowing gradients, and DeepSpeed's engine applies its own update; such steps are only counted."""
    if accelerator.scaler is not None or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "count"
    fused = cfg.optim == "adamw_torch_fused" and has_fused_adamw(accelerator.device)  # as build_optimizer decides
    if fused and accelerator.distributed_type != DistributedType.FSDP:
        return "device"
    return "host"


def smoothed_loss(logits, batch, cfg):
    """--label_smoothing_factor e: the cross-entropy against (1 - e) on the true class plus e spread
    over all classes, which is what Trainer's LabelSmoother computes."""
    return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=cfg.label_smoothing_factor)


def mean_over_rows(model, accelerator, window_rows):
    """Turn the accumulated gradient of summed row losses into the gradient of their mean.

    accelerate's backward divided each micro-batch's loss by the accumulation steps, and several
    processes average their gradients: so the gradient is the sum over the window's rows divided by
    steps x processes. Multiplying by steps x processes / rows leaves the mean over the rows.
    `window_rows` stays on the device: nothing here waits for it.
    """
    factor = accelerator.gradient_accumulation_steps * accelerator.num_processes / window_rows
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, factor)  # one fused multiply for all gradients, as clip_grad_norm_ does


def window_batches(run, index):
    """The micro-batches of the optimizer step that this epoch's micro-batch `index` belongs to: the
    accumulation steps, or fewer in an epoch's short last window (which steps all the same). DeepSpeed
    would divide by its configured accumulation steps there too (hence scale_wrt_gas=False above)."""
    steps = run.cfg.gradient_accumulation_steps
    return min(steps, len(run.train_dl) - index // steps * steps)


def batches_done(run, epoch):
    """Micro-batches of `epoch` a resumed run has already trained on (0 when not resuming into it)."""
    return (run.progress.global_step - epoch * run.steps_per_epoch) * run.cfg.gradient_accumulation_steps


def epoch_batches(run, epoch):
    """The prepared loader for `epoch`, less the batches a resumed run has already trained on.

    The shuffle order is a function of (seed, epoch), so the batches done are known and skipped.
    Skipping needs a rebuilt loader (accelerate's skip_first_batches), which accelerate 1.15 builds
    without non_blocking: that is put back, so the GPU copies stay asynchronous after a resume too.
    """
    run.train_dl.set_epoch(epoch)
    done = batches_done(run, epoch)
    if done == 0:
        return run.train_dl
    batches = run.accelerator.skip_first_batches(run.train_dl, done)
    batches._non_blocking = run.train_dl._non_blocking  # no public setter; the loader reads this one
    return batches


def loss_scale(accelerator):
    """fp16's loss scale (None without accelerate's grad scaler: fp32, bf16, DeepSpeed's own fp16)."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None


def overflowed(run):
    """Whether this step found inf/nan gradients under fp16, so that the weights did not move.

    Read from the scale: on an overflow the grad scaler skips the update and lowers its scale, and
    only then. accelerate's optimizer_step_was_skipped cannot see that with the fused AdamW: the
    scaler hands the inf/nan check to the fused kernel and calls step() every time. (It does see
    DeepSpeed's skips, whose loss scaler is DeepSpeed's own.) Reading the scale waits for the GPU
    once per step, under fp16 only; the scale before this step is the one read after the last.
    """
    scale, run.loss_scale = run.loss_scale, loss_scale(run.accelerator)
    return run.accelerator.optimizer_step_was_skipped or (scale is not None and run.loss_scale < scale)


def layer_stats_due(run):
    """--log_layer_grad_norms, on the coming step if it logs. Every process measures (with FSDP's
    sharded parameters each holds a part of every norm); the main process writes."""
    return run.layer_log is not None and (run.progress.global_step + 1) % run.cfg.logging_steps == 0


def after_step(run, step_loss, grad_norm, learning_rate, pbar, watch=None):
    """Book-keeping once optimizer step `global_step` is done: the loss sums, and the log / eval /
    save that fall due on it."""
    cfg, progress = run.cfg, run.progress
    run.unread_loss = step_loss if run.unread_loss is None else run.unread_loss + step_loss
    progress.window_steps += 1
    run.last_step = {"grad_norm": grad_norm, "learning_rate": learning_rate}
    pbar.update(1)
    if len(run.unread_checks) >= READ_CHECKS_EVERY:
        read_losses(run)
    if log_due(cfg, progress.global_step):
        write_log_line(run, pbar)
        if watch is not None:
            run.layer_log.write(watch, progress.global_step)
    last = progress.global_step >= run.total_steps  # Trainer 5 evaluates and saves there too, under "steps"
    evaluated = cfg.eval_strategy == "steps" and (progress.global_step % (cfg.eval_steps or cfg.logging_steps) == 0 or last)
    if evaluated:
        run_evaluation(run)
    if cfg.save_strategy == "steps" and (progress.global_step % cfg.save_steps == 0 or last) or best_save_due(run, evaluated):
        checkpoint(run)
    if run.profiler is not None:
        run.profiler.step()
    for hook in run.step_hooks:
        hook(run)


def log_due(cfg, step):
    """--logging_strategy steps: every --logging_steps; --logging_first_step: step 1 too (Trainer's rules)."""
    return (cfg.logging_strategy == "steps" and step % cfg.logging_steps == 0) or (cfg.logging_first_step and step == 1)


def write_log_line(run, pbar):
    """The seed's log line for the steps since the last one."""
    progress = run.progress
    read_losses(run)
    record = log_record(progress, float(run.last_step["grad_norm"]), run.last_step["learning_rate"], run.steps_per_epoch)
    if run.accelerator.scaler is not None or progress.skipped_steps:  # fp16's overflows, NaN/inf steps so far
        record["skipped_steps"] = progress.skipped_steps
    run.log.write(record, progress.global_step)
    pbar.set_postfix(loss=record["loss"])
    progress.window_loss, progress.window_steps, progress.window_nonfinite = 0.0, 0, 0


def read_losses(run):
    """Add the step losses summed on the device to progress's plain floats. Reading a device value
    makes the host wait for the device, so this happens only where a log line or a checkpoint needs
    the numbers (Trainer keeps its tr_loss on the device the same way)."""
    if run.unread_loss is not None:
        loss = float(run.unread_loss)
        run.progress.window_loss += loss
        run.progress.total_loss += loss
        run.unread_loss = None
    read_checks(run)


def read_checks(run):
    """Count the steps check_finite flagged since the last read, say which they were, and stop the
    run after --max_nonfinite_steps of them in a row. Their losses were left out of the sums."""
    checks, run.unread_checks = run.unread_checks, []
    if not checks:
        return
    progress, limit = run.progress, run.cfg.max_nonfinite_steps
    flags = torch.stack([flag for _, flag, _, _ in checks]).tolist()  # one wait, with the losses' own
    for (step, _, loss, grad_norm), flag in zip(checks, flags):
        if not flag:
            progress.nonfinite_in_row = 0
            continue
        progress.nonfinite_steps += 1
        progress.nonfinite_in_row += 1
        progress.window_nonfinite += 1  # unread checks are all in the current log window
        if run.nonfinite_skip != "count":
            progress.skipped_steps += 1
        what = f"step {step}: loss {float(loss):.4g}, grad_norm {float(grad_norm):.4g}"
        outcome = "the update was skipped" if run.nonfinite_skip != "count" else (
            "fp16's loss scaler skipped it" if run.accelerator.scaler is not None else "DeepSpeed's engine decides whether "
            "it applied the update (ZeRO-3 and fp16 skip it, ZeRO-1/2 in bf16 do not)")
        run.accelerator.print(f"{what}: not finite, {outcome} "
                              f"({progress.nonfinite_in_row} in a row; --max_nonfinite_steps {limit})", flush=True)
        if progress.nonfinite_in_row >= limit:
            first = step - progress.nonfinite_in_row + 1
            raise RunFailed(diverged_message(run, f"steps {first} to {step}, {limit} in a row, had a NaN or inf "
                                                  f"loss or gradient norm ({what})"))


def end_of_epoch(run, pbar):
    cfg = run.cfg
    if cfg.logging_strategy == "epoch" and run.progress.window_steps:
        write_log_line(run, pbar)
    evaluated = cfg.eval_strategy == "epoch"
    if evaluated:
        run_evaluation(run)
    if cfg.save_strategy == "epoch" or best_save_due(run, evaluated):
        checkpoint(run)


def run_evaluation(run, compare=True):
    """Evaluate, log, and (compare=True) hold the result against the best so far: --load_best_model_at_end,
    --save_strategy best and early stopping all read it."""
    results, confusion, _ = evaluate(run.model, run.eval_dl, run.accelerator, run.num_labels,
                                     run.cfg.label_smoothing_factor)
    results["epoch"] = round(run.progress.global_step / run.steps_per_epoch, 2)
    run.log.write(results, run.progress.global_step)
    new_best = compare and run.cfg.metric_for_best_model is not None and compare_with_best(run, results)
    run.last_eval = {"step": run.progress.global_step, "results": results, "confusion_matrix": confusion,
                     "new_best": new_best}


def compare_with_best(run, results):
    """Trainer's rules. Early stopping counts evaluations that do not beat the best so far by more than
    --early_stopping_threshold; the best is then replaced by any strictly better value. Returns
    whether this evaluation is the new best."""
    cfg, progress = run.cfg, run.progress
    metric_name = cfg.metric_for_best_model
    if metric_name not in results:
        raise UsageError(f"--metric_for_best_model {metric_name} is not among the evaluation's results "
                         f"({', '.join(k for k in results if k.startswith('eval_'))}).")
    value, best = results[metric_name], progress.best_metric
    better = best is None or (value > best if cfg.greater_is_better else value < best)
    if better and (best is None or abs(value - best) > cfg.early_stopping_threshold):
        progress.evals_without_improvement = 0
    else:
        progress.evals_without_improvement += 1
    if cfg.early_stopping_patience and progress.evals_without_improvement >= cfg.early_stopping_patience:
        run.stop_reason = (f"early stopping: {metric_name} has not improved on {progress.best_metric:.4g} "
                           f"in {progress.evals_without_improvement} evaluations")
    if better:
        progress.best_metric = value
    return better


def best_save_due(run, evaluated):
    """--save_strategy best: a checkpoint whenever this step's evaluation is the best so far."""
    return run.cfg.save_strategy == "best" and evaluated and run.last_eval["new_best"]


def stop_if_asked(run):
    """At a step boundary: if a stop signal came (to any process), save a checkpoint here and raise
    Stopped. Every process calls this at the same steps, and they agree on the answer, so all stop
    at the same step and the checkpoint is consistent."""
    name = run.stop_request.agreed()
    if name is None:
        return
    step = run.progress.global_step
    saved = run.cfg.enable_jit_checkpoint
    if saved and run.last_saved_step != step:
        checkpoint(run)
    run.accelerator.end_training()
    how = ("resume with --resume_from_checkpoint latest" if (saved or run.last_saved_step) and not run.cfg.save_only_model
           else "its checkpoint holds the model only (--save_only_model): start a new run from it"
           if saved else "no checkpoint saved (--enable_jit_checkpoint false)")
    run.accelerator.print(f"stopped at step {step} on {name}; {how}", flush=True)
    raise Stopped(name)


class Stopped(Exception):
    """The run stopped on a signal, at a step boundary. Exit code: 128 + the signal's number, as a
    process killed by it would have (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1)."""

    def __init__(self, signal_name):
        super().__init__(signal_name)
        self.exit_code = 128 + signal.Signals[signal_name].value


class StopRequest:
    """SIGTERM (preemption, scancel, kubectl delete), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
    --signal warning) ask the loop to stop at the next step boundary; a second SIGINT stops at once.

    With several processes each may get its signal at a different moment, so at each step boundary
    they agree: a max all-reduce of one integer over a CPU (gloo) group, which never waits for the GPU.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, accelerator):
        self.signal = None  # the first stop signal received by this process, as a number
        self.previous = {}
        distributed = accelerator.num_processes > 1 and torch.distributed.is_initialized()
        self.group = torch.distributed.new_group(backend="gloo") if distributed else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signal = self.signal or signum

    def agreed(self):
        """The stop signal's name if any process got one, else None."""
        flag = torch.tensor([self.signal or 0], dtype=torch.int32)
        if self.group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag)).name if int(flag) else None


def checkpoint(run):
    read_losses(run)  # the checkpoint's training_state.json carries the sums so far
    run.last_saved_step = run.progress.global_step
    if run.last_eval and run.last_eval["step"] == run.progress.global_step and run.last_eval["new_best"]:
        run.progress.best_checkpoint = checkpoint_path(run.cfg, run.progress.global_step)
    save_checkpoint(run.accelerator, run.cfg, run.progress, run.model, run.tokenizer)


def train(run):
    """Epochs until total_steps; returns the train summary."""
    start = time.perf_counter()
    first_step = run.progress.global_step
    first_epoch = first_step // run.steps_per_epoch
    pbar = tqdm(total=run.total_steps, initial=first_step, disable=not run.accelerator.is_local_main_process)
    if run.cfg.eval_on_start and first_step == 0 and run.eval_dl is not None:
        run_evaluation(run, compare=False)  # the untrained head's metrics, logged at step 0
    with run.stop_request:  # SIGTERM, SIGINT, SIGUSR1: stop at the next step boundary
        for epoch in range(first_epoch, run.num_epochs):
            train_one_epoch(run, epoch, pbar)
            if run.progress.global_step % run.steps_per_epoch == 0 or run.progress.global_step == run.total_steps:
                end_of_epoch(run, pbar)
            if run.stop_reason:
                break
            stop_if_asked(run)
    pbar.close()
    if run.stop_reason:
        run.accelerator.print(f"{run.stop_reason}; stopped at step {run.progress.global_step:,}.")
    read_losses(run)
    runtime = time.perf_counter() - start
    steps = run.progress.global_step - first_step
    return {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps * run.global_batch / runtime, 3),
        "train_steps_per_second": round(steps / runtime, 3),
        "train_loss": run.progress.total_loss / max(1, run.progress.global_step - run.progress.nonfinite_steps),
        "epoch": round(run.progress.global_step / run.steps_per_epoch, 2),
    } | ({"skipped_steps": run.progress.skipped_steps} if run.accelerator.scaler is not None else {})


def finish(run, summary):
    """Train summary, final evaluation (the seed's `trainer.evaluate()`), and the model for serving."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.profiler is not None:
        run.profiler.close()  # a run shorter than the profiling window: save what was recorded
    run.log.write(summary, run.progress.global_step)
    final = None
    if cfg.load_best_model_at_end and run.progress.best_checkpoint:
        load_best_model(run)
        run_evaluation(run, compare=False)  # the final evaluation is the best model's
    if run.eval_dl is not None:
        if run.last_eval is None or run.last_eval["step"] != run.progress.global_step:
            run_evaluation(run)  # no evaluation at the last step yet: run one now
        final = report_evaluation(accelerator, cfg, run.last_eval["results"], run.last_eval["confusion_matrix"],
                                  num_rows=len(run.eval_dl.dataset))
    if cfg.plots and accelerator.is_main_process:
        written = plots.plot_run(cfg.output_dir, model_utils.label_names(accelerator.unwrap_model(run.model)))
        accelerator.print(f"wrote {', '.join(written)}")
    require_finite_weights(run)
    try:
        model_utils.save_for_serving(accelerator, run.model, run.tokenizer, cfg.final_model_dir)
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk, a quota, a lost mount
        kept = list_checkpoints(cfg.output_dir)
        raise RunFailed(f"could not save the fine-tuned model to {cfg.final_model_dir}: {model_utils.first_line(err)}. "
                        f"Nothing half-written was left there. " + (f"The last checkpoint, {kept[-1]}, holds the "
                        f"trained state: free space, then run again with --resume_from_checkpoint latest."
                        if kept else "No checkpoint was saved.")) from None
    accelerator.print(f"saved the fine-tuned model and tokenizer to {cfg.final_model_dir}")
    accelerator.end_training()
    return final


def require_finite_weights(run):
    """Never publish a NaN model: one pass over the weights before they are saved for serving."""
    bare = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
    bad = [name for name, p in bare.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise RunFailed(diverged_message(run, f"{len(bad)} weight tensors hold NaN or inf ({bad[0]}, ...)"))


def diverged_message(run, what):
    kept = list_checkpoints(run.cfg.output_dir)
    return (f"training diverged: {what}. Nothing was written to {run.cfg.final_model_dir}. Likely causes: a "
            "learning rate too high for this model (--learning_rate, --warmup_steps), no gradient clipping "
            "(--max_grad_norm 0), or inputs the model cannot take. "
            + (f"The last checkpoint, {kept[-1]}, is kept." if kept else "No checkpoint was saved."))


def load_best_model(run):
    """--load_best_model_at_end: the weights of the checkpoint with the best --metric_for_best_model."""
    path = run.progress.best_checkpoint
    weights = load_file(os.path.join(path, "model.safetensors"))
    run.accelerator.unwrap_model(run.model, keep_torch_compile=False).load_state_dict(weights)
    run.accelerator.print(f"loaded the best model, {run.cfg.metric_for_best_model} {run.progress.best_metric:.4g}, "
                          f"from {path}")


def report_evaluation(accelerator, cfg, results, confusion_matrix, num_rows):
    """Print the results as the seed's `trainer.evaluate()` did; keep them in output_dir/eval_results.json."""
    accelerator.print(results)
    final = {**results, "eval_samples": num_rows, "confusion_matrix": confusion_matrix}
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, "eval_results.json"), final)
    return final


def evaluate_only(cfg, setup):
    """`--do_train False`: one evaluation of the given model, e.g. --model_name_or_path ./fine-tuned-bert."""
    accelerator = setup.accelerator
    model, eval_dl = accelerator.prepare(setup.model, setup.eval_dl)
    results, confusion, _ = evaluate(model, eval_dl, accelerator, len(setup.label_names), cfg.label_smoothing_factor)
    return report_evaluation(accelerator, cfg, results, confusion, num_rows=len(eval_dl.dataset))


def print_banner(run, num_train_rows):
    """The derived numbers, once, and everything that is not stock PyTorch/transformers."""
    cfg, acc = run.cfg, run.accelerator
    model = acc.unwrap_model(run.model)
    lines = [
        "***** training *****",
        f"  examples {num_train_rows:,} | processes {acc.num_processes} | device {acc.device} | "
        f"precision {acc.mixed_precision}",
        f"  batch per device {cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps}"
        f" x processes {acc.num_processes} = {run.global_batch} rows per optimizer step",
        f"  steps per epoch {run.steps_per_epoch:,} | total steps {run.total_steps:,} | warm-up steps {run.warmup_steps:,}",
        f"  engine {engine_line(acc)}",
        f"  optimizer {optimizer_line(run.optimizer, cfg)}",
        f"  model {type(model).__name__}, {model_utils.count_parameters(model):,} parameters, "
        f"attention {model.config._attn_implementation}, {compile_line(cfg)}",
    ]
    if acc.device.type == "cuda":
        lines.append(f"  GPU {model_utils.device_name(acc.device)} | fp32 matmuls {fp32_matmul_line()}")
    lines += [f"  not stock: {speedup}" for speedup in run.speedups] or ["  not stock: nothing"]
    if run.progress.global_step:
        lines.append(f"  resuming at step {run.progress.global_step:,}")
    acc.print("\n".join(lines))


ZERO_SPLITS = {1: "AdamW's state", 2: "AdamW's state and the gradients", 3: "AdamW's state, the gradients and the weights"}


def engine_line(acc):
    """What holds the model and who steps it: plain, DDP, FSDP (its sharding) or DeepSpeed (its ZeRO stage)."""
    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        split = ZERO_SPLITS.get(stage, "nothing")
        return (f"DeepSpeed ZeRO-{stage}: {split} split across the {acc.num_processes} processes; the engine clips "
                f"(gradient_clipping {ds['gradient_clipping']:g} = --max_grad_norm) and steps")
    if kind == DistributedType.FSDP:
        fsdp = acc.state.fsdp_plugin
        shard = "full shard (weights freed after each layer)" if fsdp.reshard_after_forward else "gradients and optimizer state sharded"
        return (f"FSDP{fsdp.fsdp_version}: {shard} across the {acc.num_processes} processes; "
                f"checkpoints {str(fsdp.state_dict_type).rsplit('.', 1)[-1]}")
    if acc.num_processes > 1:
        return f"DDP: each of the {acc.num_processes} processes holds the whole model; gradients averaged across them"
    return "one process: the plain model, no data parallelism"


def compile_line(cfg):
    backend = compile_backend(cfg)
    if backend is None:
        return "not compiled"
    source = "--torch_compile" if cfg.torch_compile or cfg.torch_compile_backend else "accelerate config"
    return f"torch.compile backend {backend} (from {source})"


def fp32_matmul_line():
    if torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "TF32 tensor cores (--tf32 false: full fp32)"
    hint = "; --tf32 true for TF32 tensor cores" if is_torch_tf32_available() else ""
    return f"full fp32{hint}"


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    """The command line: flags (or a config file) in, the final evaluation out."""
    with exit_on_usage_error():
        cfg = parse_config(argv)
        try:
            _, final = run_training(cfg)
        except Stopped as stop:  # a signal: the checkpoint is saved and the line printed
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
    print_banner(run, len(setup.train_ds))
    summary = train(run)
    return run, finish(run, summary)


def start_run(cfg, setup):
    """AdamW, the learning-rate schedule and everything prepared for the device and processes; the
    checkpoint loaded when resuming; the logs. Returns the Run the loop works on."""
    accelerator = setup.accelerator
    # On a CPU accelerate accepts fp16 but sets up neither fp16 autocast nor a loss scaler: the run
    # would be fp32 while saying fp16.
    require(accelerator.mixed_precision != "fp16" or accelerator.scaler is not None
            or accelerator.distributed_type == DistributedType.DEEPSPEED,
            f"--mixed_precision fp16 needs a GPU (this run is on {accelerator.device}); on a CPU use "
            "--mixed_precision bf16 or no.")
    optimizer = build_optimizer(setup.model, cfg, accelerator.device)
    # Lengths come from the prepared loader: with N processes each sees 1/N of the batches.
    model, optimizer, train_dl = accelerator.prepare(setup.model, optimizer, setup.train_dl)
    eval_dl = accelerator.prepare(setup.eval_dl) if setup.eval_dl is not None else None
    steps_per_epoch, total_steps, warmup, num_epochs = schedule_lengths(cfg, len(train_dl))
    lr_scheduler = accelerator.prepare(get_scheduler(
        cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        scheduler_specific_kwargs=scheduler_kwargs(cfg),
    ))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # prepare() hands DeepSpeed's engine only the schedule it gets with the model, and save_state
        # then saves neither: a resumed run would restart the schedule. Ours is stepped by this loop.
        accelerator.register_for_checkpointing(lr_scheduler)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
    require_shared_output_dir(accelerator, cfg.output_dir)
    resumed_step = None
    progress = Progress()
    if cfg.resume_from_checkpoint:
        progress = load_checkpoint(accelerator, cfg, cfg.resume_from_checkpoint)
        resumed_step = progress.global_step
    cfg.run_name = cfg.run_name or resumed_run_name(cfg) or default_run_name()
    accelerator.init_trackers(cfg.run_name, config=trackable(cfg))  # TensorBoard: logging_dir/<run_name>
    log = RunLog(accelerator, JsonLines(accelerator, os.path.join(cfg.output_dir, "log_history.jsonl"), resumed_step))
    run = Run(cfg, accelerator, model, optimizer, lr_scheduler, train_dl, eval_dl, setup.tokenizer,
              len(setup.label_names), steps_per_epoch, total_steps, warmup, num_epochs, log, progress, setup.speedups,
              loss_scale=loss_scale(accelerator), nonfinite_skip=nonfinite_skip(cfg, accelerator))
    attach_study_tools(run, resumed_step)
    run.stop_request = StopRequest(accelerator)
    return run


def require_shared_output_dir(accelerator, output_dir):
    """With several processes, every one must see the folder the main process writes in: each
    writes its part of a checkpoint there, and the main process renames the whole. On several
    machines that needs a shared filesystem (NFS, Lustre, ...). Checked once, with a file the main
    process writes and every process reads back."""
    if accelerator.num_processes == 1:
        return
    token = [os.urandom(8).hex() if accelerator.is_main_process else None]
    broadcast_object_list(token)  # the same random name on every process
    path = os.path.join(output_dir, f".shared-check-{token[0]}")
    if accelerator.is_main_process:
        with open(path, "w") as f:
            f.write(token[0])
    accelerator.wait_for_everyone()
    blind = int(accelerator.reduce(torch.tensor(float(not os.path.isfile(path)), device=accelerator.device), "sum"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.remove(path)
    require(not blind, f"--output_dir {output_dir!r}: {blind} of the {accelerator.num_processes} processes do not see "
                       "the folder the main process writes in, so checkpoints could not be assembled there. On "
                       "several machines, put --output_dir on a filesystem they all mount (NFS, Lustre, ...), at the "
                       "same path.")


def attach_study_tools(run, resumed_step=None):
    """--log_layer_grad_norms and --profile_steps: with the flags off nothing is created and nothing runs."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.log_layer_grad_norms:
        jsonl = JsonLines(accelerator, os.path.join(cfg.output_dir, "layer_stats.jsonl"), resumed_step)
        run.layer_log = study.LayerLog(accelerator, jsonl)
    if cfg.profile_steps:
        run.profiler = study.StepProfiler(run.model, cfg.profile_steps, os.path.join(cfg.logging_dir, "profile"),
                                          os.path.join(cfg.output_dir, "profile_summary.txt"), accelerator)


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


if __name__ == "__main__":
    main()
