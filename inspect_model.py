"""Walk through one forward and one backward pass of BERT on one real batch, and print both.

Takes train_loop.py's model and data flags and builds everything through train_loop.build, the
setup training itself uses: the same tokenizer, batches, model (its --attn_implementation, and on a
CPU the speed-ups of cpu_speed.py), AdamW and Accelerator (so --mixed_precision shows the dtypes
autocast really produces). It says first what it walks through, then takes one training batch and prints:

  forward   every block's output from the embeddings through each encoder layer's attention and
            feed-forward halves to the pooler, the classifier and the loss: shape, dtype, mean,
            std and max |x| of the activations
  backward  the gradient norm of every parameter tensor, grouped by layer, the largest marked,
            and the update/weight ratio ||Δw|| / ||w|| one AdamW step at --learning_rate makes

The step is really taken (clipping, weight decay and all) and then undone: the model is left as
loaded. Nothing in the model's code changes; hooks read it from outside and are removed after.

    python inspect_model.py --model_name_or_path ../shared/models/minilm-l6 \\
        --dataset_name ../shared/data/imdb --max_length 128 --per_device_train_batch_size 8
    python inspect_model.py ... --mixed_precision bf16     # bf16 autocast: see which outputs are bf16
    python inspect_model.py ... --detail all               # every module, down to each Linear and GELU
"""

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

import model_utils
import study
import train_loop
from errors import UsageError, exit_on_usage_error


# -----------------------------------------------------------------------------
# config: train_loop's flags plus one of our own


@dataclass
class InspectConfig:
    detail: Literal["blocks", "all"] = field(
        default="blocks", metadata={"help": "blocks: embeddings, attention/FFN halves, layers, pooler, head; "
                                            "all: every module with a forward"}
    )


def parse_config(argv=None):
    """TrainConfig's flags (one batch of training rows; no evaluation, no trackers) + InspectConfig."""
    parser = HfArgumentParser((train_loop.TrainConfig, InspectConfig))
    try:
        cfg, inspect_cfg = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        raise UsageError(f"{err}. Run `python inspect_model.py --help` for every flag.") from None
    cfg.eval_split, cfg.eval_strategy, cfg.report_to = "", "no", "none"
    # Enough rows for two classes in any seeded subset; tokenizing the full train split is not needed.
    cfg.max_train_samples = cfg.max_train_samples or max(64, cfg.per_device_train_batch_size)
    return train_loop.validate_config(cfg), inspect_cfg


# -----------------------------------------------------------------------------
# setup: train_loop's own setup path, one batch


def setup(cfg):
    """(accelerator, prepared model, prepared AdamW, one training batch on the device, what is walked through).

    train_loop.build is what training itself calls: the same tokenizer, batches and model, with the
    same --attn_implementation and, on a CPU, the same speed-ups (cpu_speed.py).
    """
    built = train_loop.build(cfg)
    accelerator = built.accelerator
    optimizer = train_loop.build_optimizer(built.model, cfg)
    model, optimizer, train_dl = accelerator.prepare(built.model, optimizer, built.train_dl)
    return accelerator, model, optimizer, next(iter(train_dl)), describe(accelerator, model, built.speedups)


def describe(accelerator, model, speedups):
    """What the walk-through runs, stated before the tables: the model exactly as training builds it."""
    bare = accelerator.unwrap_model(model)
    lines = [f"WALK-THROUGH  {type(bare).__name__} ({bare.config.name_or_path}), "
             f"{model_utils.count_parameters(bare):,} parameters, attention {bare.config._attn_implementation}, "
             f"device {accelerator.device}, precision {accelerator.mixed_precision}: the model train_loop.py trains"]
    lines += [f"  not stock: {speedup}" for speedup in speedups] or ["  not stock: nothing"]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the walk-through


def walk_through(model, batch, optimizer, accelerator, max_grad_norm, keep=study.is_block):
    """Forward with hooks, backward, one measured-and-undone optimizer step: (activation rows, LayerWatch).

    Train mode, as in training, so dropout is on. The optimizer's state is put back too, so
    the model and optimizer are left exactly as they were, gradients cleared.
    """
    model.train()
    with study.record_activations(accelerator.unwrap_model(model), keep) as rows:
        outputs = model(**batch)  # logits (B, num_labels) and the batch-mean cross-entropy
    rows.append(study.activation_row("loss", outputs.loss))
    accelerator.backward(outputs.loss)
    watch = study.LayerWatch(model, accelerator)  # gradient norms before clipping, weights before the step
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    # AdamW keeps moments per parameter: its first step is lr * g / (|g| + eps) per element, about
    # lr * sign(g), plus the decoupled weight decay lr * wd * w. Taking the real step and measuring
    # it shows that, without our restating the optimizer's formula.
    saved_state = copy.deepcopy(optimizer.state_dict())  # the moments, which the step would change in place
    optimizer.step()
    watch.measure_update()
    watch.undo_update()
    optimizer.load_state_dict(saved_state)
    optimizer.zero_grad(set_to_none=True)
    return rows, watch


# -----------------------------------------------------------------------------
# printing


def forward_table(rows, batch, precision):
    """One line per recorded module output; a blank line between layers."""
    ids = batch["input_ids"]
    width = max([48] + [len(row.path) for row in rows])
    real = batch["attention_mask"].float().mean().item() if "attention_mask" in batch else 1.0
    lines = [f"FORWARD  one batch: {ids.shape[0]} rows x {ids.shape[1]} tokens ({real:.0%} real tokens, "
             f"the rest padding), precision {precision}, train mode (dropout on)",
             "         statistics over every element of the output, padding positions included",
             f"{'module':<{width}} {'output shape':<16} {'dtype':<9} {'mean':>9} {'std':>9} {'max |x|':>9}"]
    previous = None
    for row in rows:
        layer = study.layer_of(row.path)
        if previous is not None and layer != previous and "layer." in previous + layer:
            lines.append("")  # a blank line around each encoder layer's rows
        previous = layer
        lines.append(f"{row.path:<{width}} {str(row.shape):<16} {row.dtype:<9} "
                     f"{row.mean:>9.4f} {row.std:>9.4f} {row.max_abs:>9.4f}")
    return "\n".join(lines)


def backward_table(watch, learning_rate, max_grad_norm):
    """Per layer: its gradient norm and update ratio, then each of its tensors; the largest marked."""
    tensors = watch.per_tensor()
    layers = watch.per_layer()
    largest_tensor = max(tensors, key=lambda t: t[3])[0]
    largest_layer = max(layers, key=lambda k: layers[k]["grad_norm"])
    total = watch.total_grad_norm()
    if not max_grad_norm or total <= max_grad_norm:
        clip = "not clipped" + (f": below --max_grad_norm {max_grad_norm:g}" if max_grad_norm else "")
    else:
        clip = f"--max_grad_norm {max_grad_norm:g} scales every gradient by {max_grad_norm / total:.3g}"
    lines = [f"BACKWARD  gradient norms before clipping: total {total:.4g} ({clip})",
             f"          update/weight = ||Δw|| / ||w|| of one AdamW step at lr {learning_rate:g}, taken and undone",
             f"{'layer / parameter tensor':<48} {'shape':<16} {'grad norm':>10} {'||w||':>9} {'update/w':>9}"]
    for layer, stats in layers.items():
        mark = "  <== largest layer" if layer == largest_layer else ""
        lines.append(f"{layer:<48} {'':<16} {stats['grad_norm']:>10.4g} {'':>9} {fmt(stats['update_ratio']):>9}{mark}")
        for name, tensor_layer, shape, grad, weight, ratio in tensors:
            if tensor_layer == layer:
                mark = "  <== largest tensor" if name == largest_tensor else ""
                short = name.split(f"{layer}.", 1)[-1]
                lines.append(f"  {short:<46} {str(shape):<16} {grad:>10.4g} {weight:>9.4g} {fmt(ratio):>9}{mark}")
    return "\n".join(lines)


def fmt(value):
    return "-" if value is None else f"{value:.2e}"


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    with exit_on_usage_error():
        cfg, inspect_cfg = parse_config(argv)
        accelerator, model, optimizer, batch, what = setup(cfg)
        keep = study.every_module if inspect_cfg.detail == "all" else study.is_block
        rows, watch = walk_through(model, batch, optimizer, accelerator, cfg.max_grad_norm, keep)
        accelerator.print(what)
        accelerator.print()
        accelerator.print(forward_table(rows, batch, accelerator.mixed_precision))
        accelerator.print()
        accelerator.print(backward_table(watch, optimizer.param_groups[0]["lr"], cfg.max_grad_norm))
        return rows, watch


if __name__ == "__main__":
    main()
