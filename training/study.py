"""Study mode: watch a forward and a backward pass of the unchanged model, from the outside.

Nothing here edits model code. Forward hooks read each module's output as it is produced;
gradients are read from `.grad` after backward; torch.profiler times whole training steps.
Each tool exists only while asked for, so with the flags off training does no extra work:

    with record_activations(model) as rows:          # forward hooks, removed on exit
        outputs = model(**batch)
    accelerator.backward(outputs.loss)
    watch = LayerWatch(model, accelerator)           # grad norms now (before clipping) ...
    accelerator.clip_grad_norm_(model.parameters(), 1.0); optimizer.step()
    watch.measure_update()                           # ... and what the step did to each weight
    watch.per_layer()                                # {layer: {"grad_norm", "update_ratio"}}

    profiler = StepProfiler(model, 4, trace_dir, summary_path, accelerator)
    profiler.step()                                  # once per optimizer step; it stops itself

`inspect_model.py` prints the one-batch walk-through; `train_loop.py` uses `LayerLog` and
`StepProfiler` behind --log_layer_grad_norms and --profile_steps.
"""

import glob
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from training.runlog import JsonLines


# -----------------------------------------------------------------------------
# forward: one row per module output


@dataclass
class ActivationRow:
    path: str  # module path, as in model.named_modules()
    shape: tuple
    dtype: str  # as produced: under autocast, Linear outputs are bf16/fp16 and LayerNorm outputs fp32
    mean: float
    std: float
    max_abs: float


def is_block(path, module):
    """The default rows: modules that contain others (embeddings, each encoder layer, its attention
    and feed-forward halves, the pooler) and the top-level head, not every Linear inside them.
    Dropout is skipped: in train mode it only zeroes and rescales what the row above shows."""
    if path == "" or isinstance(module, (nn.Dropout, nn.ModuleList)):
        return False
    return any(True for _ in module.children()) or "." not in path


def every_module(path, module):
    """--detail all: every module with a forward of its own, down to each Linear, LayerNorm and GELU."""
    return path != "" and not isinstance(module, nn.ModuleList)


@contextmanager
def record_activations(model, keep=is_block):
    """Yield a list that fills with an ActivationRow per kept module, in the order outputs are produced.

    A module's forward hook fires when the module returns, so a block's row comes right after
    the rows of the modules inside it. Statistics are taken at once and the tensor is let go:
    recording costs no activation memory. Every hook is removed on exit, error or not.
    """
    rows, handles = [], []
    try:
        for path, module in model.named_modules():
            if keep(path, module):
                handles.append(module.register_forward_hook(row_recorder(rows, path)))
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def row_recorder(rows, path):
    def hook(module, inputs, output):
        tensor = first_tensor(output)
        if tensor is not None and tensor.is_floating_point():
            rows.append(activation_row(path, tensor))

    return hook


def first_tensor(output):
    """Modules return a tensor, a tuple or a ModelOutput; the hidden states come first in each."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def activation_row(path, tensor):
    """Mean, std and max-abs over every element (padding positions included), computed in fp32."""
    x = tensor.detach().float()
    mean, std, max_abs = torch.stack([x.mean(), x.std(correction=0), x.abs().max()]).tolist()
    return ActivationRow(path, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), mean, std, max_abs)


# -----------------------------------------------------------------------------
# backward: gradient norms per tensor and per layer, and what one optimizer step does


LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)(?:\.|$)")


def layer_of(name, base_prefix="bert"):
    """The layer a parameter or module belongs to: bert.encoder.layer.3.attention.self.query.weight ->
    layer.3; bert.embeddings.word_embeddings.weight -> embeddings; classifier.bias -> classifier."""
    match = LAYER_RE.search(name)
    if match:
        return f"layer.{match.group(1)}"
    return name.removeprefix(base_prefix + ".").split(".")[0]


def tensor_norms(tensors):
    """L2 norm of each tensor, in fp32, fetched to the host in one transfer.

    Under FSDP2 a parameter (and its gradient) is a DTensor, of which each process holds a shard:
    its norm is then a partial one per process, and `full_tensor()` combines them (an all-reduce),
    so every process must call this at the same point, with the same tensors.
    """
    if not tensors:
        return []
    norms = [torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors]
    return torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).tolist()


def combine(norms):
    """The norm of several tensors seen as one vector: sqrt of the sum of their squared norms."""
    return math.sqrt(sum(n * n for n in norms))


def loss_scale(accelerator):
    """fp16 multiplies the loss by a scale (so small gradients survive in fp16) until clip_grad_norm_
    or the optimizer step divides it out again; 1.0 in fp32 and bf16, which need no scaling."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0


class LayerWatch:
    """One optimizer step seen per parameter tensor: gradient norm, weight norm, update norm.

    Create it after backward and before clipping: the gradient norms are the pre-clip ones, the
    same the `grad_norm` log value totals, with any fp16 loss scale divided out. It also keeps a
    copy of the weights, so after `optimizer.step()` the update each tensor received is measured
    (`per_tensor`, `per_layer`) as it really happened: AdamW's moments, weight decay and clipping
    included, rather than estimated from a formula.
    """

    def __init__(self, model, accelerator):
        bare = accelerator.unwrap_model(model)
        self.base_prefix = getattr(bare, "base_model_prefix", "")
        named = [(name, p) for name, p in bare.named_parameters() if p.grad is not None]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        scale = loss_scale(accelerator)
        self.grad_norms = [n / scale for n in tensor_norms([p.grad for p in self.params])]
        self.weights_before = [p.detach().clone() for p in self.params]
        self.weight_norms = tensor_norms(self.weights_before)
        self.update_norms = None

    def measure_update(self):
        """Call after optimizer.step(): ||w_after - w_before|| per tensor."""
        self.update_norms = tensor_norms([p.detach() - w for p, w in zip(self.params, self.weights_before)])

    def undo_update(self):
        """Put the weights back as they were before the step (the walk-through measures, never trains)."""
        with torch.no_grad():
            for p, w in zip(self.params, self.weights_before):
                p.copy_(w)

    def per_tensor(self):
        """[(name, layer, shape, grad norm, weight norm, update/weight ratio or None)] in parameter order."""
        updates = self.update_norms or [None] * len(self.names)
        return [
            (name, layer_of(name, self.base_prefix), tuple(p.shape), g, w, ratio(u, w))
            for name, p, g, w, u in zip(self.names, self.params, self.grad_norms, self.weight_norms, updates)
        ]

    def per_layer(self):
        """{layer: {"grad_norm", "update_ratio"}}: each layer's tensors taken together as one vector."""
        groups = {}
        updates = self.update_norms or [math.nan] * len(self.names)
        for name, g, w, u in zip(self.names, self.grad_norms, self.weight_norms, updates):
            groups.setdefault(layer_of(name, self.base_prefix), []).append((g, w, u))
        return {
            layer: {"grad_norm": combine(g for g, _, _ in rows),
                    "update_ratio": ratio(combine(u for _, _, u in rows), combine(w for _, w, _ in rows))}
            for layer, rows in groups.items()
        }

    def total_grad_norm(self):
        return combine(self.grad_norms)


def ratio(update, weight):
    """||update|| / ||weight||; a weight that starts at zero (a fresh bias) has no meaningful ratio."""
    if update is None or math.isnan(update):
        return None
    return update / weight if weight > 0 else None


# -----------------------------------------------------------------------------
# during training: per-layer statistics on logging steps (--log_layer_grad_norms)


class LayerLog:
    """layer_stats.jsonl in output_dir plus two TensorBoard chart groups, layer_grad_norm/* and
    layer_update_ratio/*, one point per layer per logging step. `jsonl` is a runlog.JsonLines
    for layer_stats.jsonl (the same file handling as log_history.jsonl: main process, resumable);
    `every`: the logging steps, whose steps are measured."""

    def __init__(self, accelerator, jsonl, every=1):
        self.accelerator = accelerator
        self.jsonl = jsonl
        self.every = every

    def due(self, step):
        """Whether optimizer step `step` is measured. Every process measures (with FSDP's sharded
        parameters each holds a part of every norm); the main process writes."""
        return step % self.every == 0

    def write(self, watch, step):
        watch.measure_update()
        layers = watch.per_layer()
        record = {"step": step,
                  "grad_norm": {k: v["grad_norm"] for k, v in layers.items()},
                  "update_ratio": {k: v["update_ratio"] for k, v in layers.items()}}
        self.jsonl.append(record)
        scalars = {f"layer_grad_norm/{k}": v for k, v in record["grad_norm"].items()}
        scalars.update({f"layer_update_ratio/{k}": v for k, v in record["update_ratio"].items() if v is not None})
        self.accelerator.log(scalars, step=step)
        return record


# -----------------------------------------------------------------------------
# the profiler (--profile_steps): where the time of a training step goes


PROFILE_SKIP_STEPS = 2  # the first steps allocate memory and warm caches: not what a step costs
PROFILE_WARMUP_STEPS = 1  # the profiler's own start-up lands in a step it records and throws away
FORWARD_LABEL = "study: forward"

# Each phase by how torch names its events: DataLoader's __next__ and Optimizer.step/zero_grad are
# labelled by torch itself, every backward function runs as an autograd::engine event, and the
# forward is labelled by the two hooks StepProfiler puts on the model.
PHASES = {
    "data loading": lambda name: name.startswith("enumerate(DataLoader)"),
    "forward": lambda name: name == FORWARD_LABEL,
    "backward": lambda name: name.startswith("autograd::engine::evaluate_function"),
    "optimizer step": lambda name: name.startswith("Optimizer."),
}


class StepProfiler:
    """torch.profiler over `num_steps` optimizer steps after a warm-up of a few; call `step()` once
    per optimizer step. When the window is done it writes the trace (Chrome / Perfetto / TensorBoard
    profiler plugin) into `trace_dir`, prints the phase shares and top operators, writes them to
    `summary_path`, and removes itself: the remaining steps run unprofiled."""

    def __init__(self, model, num_steps, trace_dir, summary_path, accelerator):
        self.accelerator = accelerator
        self.trace_dir, self.summary_path = trace_dir, summary_path
        self.steps_left = PROFILE_SKIP_STEPS + PROFILE_WARMUP_STEPS + num_steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(skip_first=PROFILE_SKIP_STEPS, wait=0, warmup=PROFILE_WARMUP_STEPS,
                                             active=num_steps, repeat=1),
            on_trace_ready=self.trace_ready,
        )
        self.handles = label_forward(accelerator.unwrap_model(model))
        self.summary = None
        self.profile.start()

    def step(self):
        if self.profile is None:
            return
        self.profile.step()
        self.steps_left -= 1
        if self.steps_left == 0:
            self.close()

    def close(self):
        """Stop (a run shorter than the window saves what it recorded) and take the hooks off."""
        if self.profile is None:
            return
        self.profile.stop()
        self.profile = None
        for handle in self.handles:
            handle.remove()

    def trace_ready(self, prof):
        os.makedirs(self.trace_dir, exist_ok=True)
        worker = f"rank{self.accelerator.process_index}"  # every process profiles and writes its own trace
        torch.profiler.tensorboard_trace_handler(self.trace_dir, worker_name=worker)(prof)
        trace = max(glob.glob(os.path.join(self.trace_dir, f"{worker}.*.pt.trace.json")), key=os.path.getmtime)
        self.summary = profile_summary(prof, trace)
        if self.accelerator.is_main_process:
            self.accelerator.print(self.summary)
            with open(self.summary_path, "w") as f:
                f.write(self.summary + "\n")


def label_forward(model):
    """A pre-hook opens a `study: forward` profiler range and a hook closes it: the forward shows up
    as one block in the trace without a line of the training step changing."""
    ranges = []

    def enter(module, args, kwargs):
        ranges.append(torch.autograd.profiler.record_function(FORWARD_LABEL))
        ranges[-1].__enter__()

    def leave(module, args, kwargs, output):
        ranges.pop().__exit__(None, None, None)

    return [model.register_forward_pre_hook(enter, with_kwargs=True),
            model.register_forward_hook(leave, with_kwargs=True)]


def phase_times(events):
    """{"step": total µs of the profiled steps, phase: µs} from the profiler's events.

    A phase counts its outermost events only (a DataLoader call inside another is not counted
    twice). What no phase claims, such as clipping, the learning-rate schedule and logging, is
    the rest of the step.
    """
    times = {"step": 0.0, **{phase: 0.0 for phase in PHASES}}
    for event in events:
        if event.name.startswith("ProfilerStep"):
            times["step"] += event.cpu_time_total
            continue
        phase = phase_of(event.name)
        if phase and not any(phase_of(parent.name) == phase for parent in ancestors(event)):
            times[phase] += event.cpu_time_total
    return times


def phase_of(name):
    return next((phase for phase, matches in PHASES.items() if matches(name)), None)


def ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def profile_summary(prof, trace_path, top=12):
    """The shares of a step's time by phase, the top operators, and where the trace is."""
    times = phase_times(prof.events())
    steps = sum(1 for e in prof.events() if e.name.startswith("ProfilerStep"))
    total = times.pop("step") or 1.0
    times["other"] = max(total - sum(times.values()), 0.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"profiled {steps} training steps after {PROFILE_SKIP_STEPS + PROFILE_WARMUP_STEPS} warm-up steps: "
             f"{total / steps / 1e3:.1f} ms per step (wall time seen from the CPU)"]
    for phase, micros in times.items():
        lines.append(f"  {phase:<15} {100 * micros / total:5.1f}%  {micros / steps / 1e3:9.1f} ms/step")
    lines.append("  (other: gradient clipping, the learning-rate schedule, logging and the loop itself)")
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    lines.append(f"top operators by {sort_by.replace('_', ' ')}:")
    lines.append(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=40))
    lines.append(f"trace: {trace_path}\n  open it in https://ui.perfetto.dev or chrome://tracing, or with "
                 "TensorBoard's profiler plugin (torch-tb-profiler) pointed at its folder")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# from the training flags


def tools(cfg, accelerator, model, resumed_step=None):
    """(LayerLog or None, StepProfiler or None) for --log_layer_grad_norms and --profile_steps: with
    the flags off nothing is created and nothing runs."""
    layer_log = profiler = None
    if cfg.log_layer_grad_norms:
        jsonl = JsonLines(accelerator, os.path.join(cfg.output_dir, "layer_stats.jsonl"), resumed_step)
        layer_log = LayerLog(accelerator, jsonl, every=cfg.logging_steps)
    if cfg.profile_steps:
        profiler = StepProfiler(model, cfg.profile_steps, os.path.join(cfg.logging_dir, "profile"),
                                os.path.join(cfg.output_dir, "profile_summary.txt"), accelerator)
    return layer_log, profiler
