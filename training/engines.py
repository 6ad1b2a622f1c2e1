"""Engines: what runs the model (one process, DDP, FSDP, DeepSpeed), in which precision, compiled or
not, and what each of them does differently in a training step.

Built from `accelerate config` / `accelerate launch` and our flags, with one source of truth for
the numbers DeepSpeed's engine applies itself (batch, accumulation, clipping: `configure_deepspeed`).
In the step, three engine cases sit behind one name each: `RowMean` (the step's gradient as a mean
over its rows; DeepSpeed's engine steps inside backward), `OverflowCheck` (fp16's grad scaler
skipping a step) and `fused_adamw` (which the NaN guard in faults.py relies on).
"""

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType
from transformers.utils.import_utils import enable_tf32, is_torch_tf32_available

from training.config import data_seed
from training.errors import UsageError, require


# -----------------------------------------------------------------------------
# the accelerator: devices, processes, precision, trackers


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


def pins_memory(cfg, device):
    """--dataloader_pin_memory (on by default, as in Trainer), on CUDA only: page-locked batches are
    what lets the copy to the GPU run while the CPU goes on; elsewhere pinning would only cost."""
    return cfg.dataloader_pin_memory and device.type == "cuda"


def require_real_fp16(accelerator):
    """On a CPU accelerate accepts fp16 but sets up neither fp16 autocast nor a loss scaler: the run
    would be fp32 while saying fp16. (Checked after `build`, so a test can set up both by hand.)"""
    require(accelerator.mixed_precision != "fp16" or accelerator.scaler is not None
            or accelerator.distributed_type == DistributedType.DEEPSPEED,
            f"--mixed_precision fp16 needs a GPU (this run is on {accelerator.device}); on a CPU use "
            "--mixed_precision bf16 or no.")


def prepare_schedule(accelerator, lr_scheduler):
    """The schedule, prepared, and saved in every checkpoint under every engine."""
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # prepare() hands DeepSpeed's engine only the schedule it gets with the model, and save_state
        # then saves neither: a resumed run would restart the schedule. Ours is stepped by the loop.
        accelerator.register_for_checkpointing(lr_scheduler)
    return lr_scheduler


# -----------------------------------------------------------------------------
# AdamW: fused where this torch has the kernel


def fused_adamw(cfg, device):
    """--optim adamw_torch_fused, where the kernel exists: what build_optimizer asks torch for."""
    return cfg.optim == "adamw_torch_fused" and has_fused_adamw(device)


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


# -----------------------------------------------------------------------------
# the step under each engine


class RowMean:
    """The micro-batches of one optimizer step, whose gradient and loss are means over all their rows.

    Each micro-batch's backward is of its rows' summed loss, and the step divides by the rows it
    really holds: each row weighs the same however many micro-batches (and rows) its window has,
    and an epoch's last window may be short. `num_batches`: the prepared loader's, this epoch.
    """

    def __init__(self, accelerator, model, accumulation_steps, num_batches):
        self.accelerator, self.model = accelerator, model
        self.accumulation_steps, self.num_batches = accumulation_steps, num_batches
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.loss_sum, self.rows = 0.0, 0  # this step's micro-batches so far: their rows' summed loss, their rows

    def backward(self, loss, rows, index):
        """grads += d(sum of the rows' losses / accumulation steps)/dw, for micro-batch `index` of the epoch.

        DeepSpeed's engine steps inside the backward of the step's last micro-batch, before we could
        divide by rows: it gets each micro-batch's mean loss over the micro-batches of its window.
        """
        if not self.deepspeed:
            self.accelerator.backward(loss * rows)
        else:
            self.accelerator.backward(loss / self.window_batches(index), scale_wrt_gas=False)
        self.loss_sum += loss.detach() * rows
        self.rows += rows

    def step_mean(self):
        """At the step's last micro-batch: the gradient becomes the mean over the step's rows, all
        processes' (DeepSpeed's engine has stepped already); returns the mean loss over those rows,
        the same on every process, and starts the next step's sums."""
        window_rows = self.accelerator.reduce(torch.tensor(float(self.rows), device=self.accelerator.device), "sum")
        if not self.deepspeed:
            mean_over_rows(self.model, self.accelerator, window_rows)
        step_loss = self.accelerator.reduce(self.loss_sum, reduction="sum") / window_rows
        self.loss_sum, self.rows = 0.0, 0
        return step_loss

    def window_batches(self, index):
        """The micro-batches of the optimizer step that this epoch's micro-batch `index` belongs to: the
        accumulation steps, or fewer in an epoch's short last window (which steps all the same). DeepSpeed
        would divide by its configured accumulation steps there too (hence scale_wrt_gas=False above)."""
        steps = self.accumulation_steps
        return min(steps, self.num_batches - index // steps * steps)


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


def loss_scale(accelerator):
    """fp16's loss scale (None without accelerate's grad scaler: fp32, bf16, DeepSpeed's own fp16)."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None

class OverflowCheck:
    """Whether the step just taken found inf/nan gradients under fp16, so that the weights did not move.

    Read from the scale: on an overflow the grad scaler skips the update and lowers its scale, and
    only then. accelerate's optimizer_step_was_skipped cannot see that with the fused AdamW: the
    scaler hands the inf/nan check to the fused kernel and calls step() every time. (It does see
    DeepSpeed's skips, whose loss scaler is DeepSpeed's own.) Reading the scale waits for the GPU
    once per step, under fp16 only; the scale before this step is the one read after the last.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.scale = loss_scale(accelerator)

    def skipped(self):
        scale, self.scale = self.scale, loss_scale(self.accelerator)
        return self.accelerator.optimizer_step_was_skipped or (scale is not None and self.scale < scale)


# -----------------------------------------------------------------------------
# what the banner says about them


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
