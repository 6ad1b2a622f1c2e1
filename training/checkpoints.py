"""Checkpoints: saving one, proving it whole, finding it again, resuming from it, and the best one.

A checkpoint is accelerate's state (model, optimizer, schedule, RNG, scaler) plus our progress and
settings as JSON, and the model's config and tokenizer, so it is also a model folder. It is written
under tmp-checkpoint-N, completed by a manifest (each file's size and sha256) and renamed: a crash
mid-save leaves nothing `--resume_from_checkpoint latest` could pick, and a checkpoint damaged
later is known by its manifest. Also here: --save_total_limit's rotation, resuming across
precisions and mid-epoch, the best checkpoint (--load_best_model_at_end, early stopping), and the
model saved for serving at the end.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate.utils import OPTIMIZER_NAME, SCALER_NAME, DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file

import model_utils
from training.errors import RunFailed, UsageError, require


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


# Changing these between a checkpoint and its resume would change which rows each step sees.
RESUME_MUST_MATCH = ("dataset_name", "train_split", "max_train_samples", "max_length", "seed", "data_seed",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes",
                     "group_by_length")


# -----------------------------------------------------------------------------
# finding a checkpoint, and knowing it is whole


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


# -----------------------------------------------------------------------------
# saving


def save_checkpoint(accelerator, cfg, progress, model, tokenizer, card=None):
    """Model, optimizer, scheduler, RNG and scaler via `save_state`; progress and our settings as
    JSON; and the model's config, tokenizer and card (README.md, training/model_card.py), so that
    `from_pretrained`, `pipeline()` and the Hub read the checkpoint as a model folder, as Trainer's.

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
    error = attempt(write_checkpoint, accelerator, cfg, progress, model, tokenizer, tmp, card)
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


def write_checkpoint(accelerator, cfg, progress, model, tokenizer, tmp, card=None):
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
        if card is not None:
            card.save(os.path.join(tmp, "README.md"))


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


# -----------------------------------------------------------------------------
# resuming


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


def batches_done(run, epoch):
    """Micro-batches of `epoch` a resumed run has already trained on (0 when not resuming into it).
    `run`: train_loop's Run, or anything with its progress, steps_per_epoch and cfg."""
    return (run.progress.global_step - epoch * run.steps_per_epoch) * run.cfg.gradient_accumulation_steps


def epoch_batches(run, epoch):
    """The prepared loader for `epoch`, less the batches a resumed run has already trained on.

    The shuffle order is a function of (seed, epoch), so the batches done are known and skipped.
    Skipping needs a rebuilt loader (accelerate's skip_first_batches), which accelerate 1.15 builds
    without non_blocking (1.16 passes it on): that is put back, so the GPU copies stay asynchronous
    after a resume too.
    """
    run.train_dl.set_epoch(epoch)
    done = batches_done(run, epoch)
    if done == 0:
        return run.train_dl
    batches = run.accelerator.skip_first_batches(run.train_dl, done)
    batches._non_blocking = run.train_dl._non_blocking  # no public setter; the loader reads this one
    return batches


# -----------------------------------------------------------------------------
# the best checkpoint, and early stopping


def compare_with_best(cfg, progress, results):
    """Trainer's rules. Early stopping counts evaluations that do not beat the best so far by more than
    --early_stopping_threshold; the best is then replaced by any strictly better value. Returns
    (whether this evaluation is the new best, why early stopping ends the run or None)."""
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
    stop_reason = None
    if cfg.early_stopping_patience and progress.evals_without_improvement >= cfg.early_stopping_patience:
        stop_reason = (f"early stopping: {metric_name} has not improved on {progress.best_metric:.4g} "
                       f"in {progress.evals_without_improvement} evaluations")
    if better:
        progress.best_metric = value
    return better, stop_reason


def load_best_model(accelerator, cfg, progress, model):
    """--load_best_model_at_end: the weights of the checkpoint with the best --metric_for_best_model."""
    path = progress.best_checkpoint
    weights = load_file(os.path.join(path, "model.safetensors"))
    accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(weights)
    accelerator.print(f"loaded the best model, {cfg.metric_for_best_model} {progress.best_metric:.4g}, from {path}")


# -----------------------------------------------------------------------------
# the model for serving


def save_for_serving(accelerator, cfg, model, tokenizer, card=None):
    """model_utils.save_for_serving into --final_model_dir, with the model card; a full disk, a quota
    or a lost mount ends the run with what was kept and how to go on."""
    try:
        model_utils.save_for_serving(accelerator, model, tokenizer, cfg.final_model_dir, card)
    except (OSError, RuntimeError, SafetensorError) as err:
        kept = list_checkpoints(cfg.output_dir)
        raise RunFailed(f"could not save the fine-tuned model to {cfg.final_model_dir}: {model_utils.first_line(err)}. "
                        f"Nothing half-written was left there. " + (f"The last checkpoint, {kept[-1]}, holds the "
                        f"trained state: free space, then run again with --resume_from_checkpoint latest."
                        if kept else "No checkpoint was saved.")) from None
    accelerator.print(f"saved the fine-tuned model and tokenizer to {cfg.final_model_dir}")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
