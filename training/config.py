"""The run's settings: one typed config (TrainConfig), its command line, and the checks right after parsing.

Flag names, values and meaning are TrainingArguments' (the seed's values where it set them), so a
Trainer user types what they know; a typo names the closest flag. `python train_loop.py --help`
lists them all; docs/flags.md maps Trainer's flags to ours.
"""

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from accelerate.utils import LoggerType
from transformers import HfArgumentParser, SchedulerType

from training.checkpoints import resolve_checkpoint
from training.errors import UsageError, require


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
    # study mode (training/study.py, plots.py): off unless asked for, and then no extra work on other steps
    log_layer_grad_norms: bool = flag(False, "per-layer grad norms and update/weight ratios at each logging "
                                             "step, to TensorBoard and output_dir/layer_stats.jsonl")
    profile_steps: int = flag(0, "torch.profiler over this many steps after 3 warm-up steps; trace in "
                                 "logging_dir/profile, summary printed")
    plots: bool = flag(True, "training_curves.png and confusion_matrix.png in output_dir")


# Changing these between a checkpoint and its resume would change which rows each step sees.

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


def data_seed(cfg):
    """The seed of the training batches' order: --data_seed, else --seed (as in Trainer)."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed
