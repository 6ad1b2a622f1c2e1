"""Faults a long run meets, and what the loop does about each: stop signals (preemption, Ctrl-C,
SLURM's warning) agreed on by every process; NaN/inf steps skipped, counted, and a run of them
stopping the run; output folders that cannot be written, or that other processes cannot see.

docs/faults.md says what a user sees of each.
"""

import os
import signal
import threading

import torch
from accelerate.utils import DistributedType, broadcast_object_list

from training.checkpoints import list_checkpoints
from training.engines import fused_adamw
from training.errors import RunFailed, require


# -----------------------------------------------------------------------------
# stop signals: finish the step, save, exit 128 + the signal


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


def stop(accelerator, cfg, signal_name, step, last_saved_step):
    """End the run stopped by `signal_name` at `step` (its checkpoint, if any, saved): the trackers
    closed, one line saying how to go on, and Stopped raised."""
    saved = cfg.enable_jit_checkpoint
    accelerator.end_training()
    how = ("resume with --resume_from_checkpoint latest" if (saved or last_saved_step) and not cfg.save_only_model
           else "its checkpoint holds the model only (--save_only_model): start a new run from it"
           if saved else "no checkpoint saved (--enable_jit_checkpoint false)")
    accelerator.print(f"stopped at step {step} on {signal_name}; {how}", flush=True)
    raise Stopped(signal_name)


# -----------------------------------------------------------------------------
# NaN/inf steps: skipped one by one, a run of them stops the run


READ_CHECKS_EVERY = 32  # steps: a diverged run stops within this many of its limit, at one device sync each


def nonfinite_skip(cfg, accelerator):
    """How a NaN/inf step is skipped. "device": by the fused AdamW, with no device sync. "host": by not
    calling step(), which reads the flag (one sync per step): torch's unfused AdamW takes no flag, and
    FSDP's sharded parameters are left to plain step() calls. "count": fp16's grad scaler already skips
    overflowing gradients, and DeepSpeed's engine applies its own update; such steps are only counted."""
    if accelerator.scaler is not None or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "count"
    fused = fused_adamw(cfg, accelerator.device)  # as build_optimizer decides
    if fused and accelerator.distributed_type != DistributedType.FSDP:
        return "device"
    return "host"


class NonfiniteGuard:
    """Each step's loss and gradient norm checked for NaN/inf on the device, a flagged step's update
    skipped (as `nonfinite_skip` says how), and the flags read by the host in batches, with the
    losses: --max_nonfinite_steps flagged steps in a row stop the run.

    One NaN gradient makes the total norm NaN, so the norm that clipping computed anyway checks every
    gradient at once.
    """

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.skip = nonfinite_skip(cfg, accelerator)
        self.unread = []  # per step since the last read: (step, NaN/inf flag, loss, grad_norm) on the device

    def check(self, step, step_loss, grad_norm):
        """Whether step `step`'s loss or gradient norm is NaN or inf, as a 0-dim float on the device.
        Nothing waits for it: the host reads the flags later, with the losses (see read)."""
        finite = torch.isfinite(step_loss)
        if self.skip != "count":
            finite &= torch.isfinite(grad_norm)
        nonfinite = (~finite).float()
        self.unread.append((step, nonfinite, step_loss, grad_norm))
        return nonfinite

    def step_unless_nonfinite(self, optimizer, nonfinite):
        """optimizer.step(), which leaves weights, AdamW's moments and its step count alone where
        `nonfinite` is 1 ("count": fp16's scaler or DeepSpeed's engine decides that itself)."""
        if self.skip == "device":
            # The fused AdamW takes the flag fp16's grad scaler hands it (torch.amp.GradScaler sets the
            # optimizer's found_inf before step() and deletes it after, as here). Nothing waits for the GPU.
            optimizer.optimizer.found_inf = nonfinite
            try:
                optimizer.step()
            finally:
                del optimizer.optimizer.found_inf
        elif not (self.skip == "host" and bool(nonfinite)):  # "host": one device sync
            optimizer.step()

    def due(self):
        return len(self.unread) >= READ_CHECKS_EVERY

    def read(self, progress):
        """Count the steps `check` flagged since the last read, say which they were, and stop the
        run after --max_nonfinite_steps of them in a row. Their losses were left out of the sums."""
        checks, self.unread = self.unread, []
        if not checks:
            return
        limit = self.cfg.max_nonfinite_steps
        flags = torch.stack([flag for _, flag, _, _ in checks]).tolist()  # one wait, with the losses' own
        for (step, _, loss, grad_norm), flag in zip(checks, flags):
            if not flag:
                progress.nonfinite_in_row = 0
                continue
            progress.nonfinite_steps += 1
            progress.nonfinite_in_row += 1
            progress.window_nonfinite += 1  # unread checks are all in the current log window
            if self.skip != "count":
                progress.skipped_steps += 1
            what = f"step {step}: loss {float(loss):.4g}, grad_norm {float(grad_norm):.4g}"
            outcome = "the update was skipped" if self.skip != "count" else (
                "fp16's loss scaler skipped it" if self.accelerator.scaler is not None else "DeepSpeed's engine decides "
                "whether it applied the update (ZeRO-3 and fp16 skip it, ZeRO-1/2 in bf16 do not)")
            self.accelerator.print(f"{what}: not finite, {outcome} "
                                   f"({progress.nonfinite_in_row} in a row; --max_nonfinite_steps {limit})", flush=True)
            if progress.nonfinite_in_row >= limit:
                first = step - progress.nonfinite_in_row + 1
                raise RunFailed(diverged_message(self.cfg, f"steps {first} to {step}, {limit} in a row, had a NaN "
                                                           f"or inf loss or gradient norm ({what})"))


def require_finite_weights(accelerator, cfg, model):
    """Never publish a NaN model: one pass over the weights before they are saved for serving."""
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    bad = [name for name, p in bare.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise RunFailed(diverged_message(cfg, f"{len(bad)} weight tensors hold NaN or inf ({bad[0]}, ...)"))


def diverged_message(cfg, what):
    kept = list_checkpoints(cfg.output_dir)
    return (f"training diverged: {what}. Nothing was written to {cfg.final_model_dir}. Likely causes: a "
            "learning rate too high for this model (--learning_rate, --warmup_steps), no gradient clipping "
            "(--max_grad_norm 0), or inputs the model cannot take. "
            + (f"The last checkpoint, {kept[-1]}, is kept." if kept else "No checkpoint was saved."))


# -----------------------------------------------------------------------------
# output folders: writable, and shared by every process


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
