"""Walk through one forward and one backward pass of BERT on one real batch, and print both.

Takes train_loop.py's model and data flags and builds everything through train_loop.build, the
setup training itself uses: the same tokenizer, batches, model (its --attn_implementation, and on a
CPU the speed-ups of training/cpu_speed.py), AdamW and Accelerator (so --mixed_precision shows the dtypes
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

With --explain TEXT it asks the other question, what the backward pass says about the *input*:
why a trained model (--model_dir, default ./fine-tuned-bert) classified TEXT as it did. It prints
each word's Integrated Gradients score for the predicted class (training/explain.py says what IG computes
and why plain gradients are not enough), the tokens [CLS] attends to in each layer, and writes two
pictures into --output_dir: explain_words.png and explain_attention.png.

    python inspect_model.py --explain "A wonderful film, though far too long." --model_dir fine-tuned-bert
"""

import copy
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import HfArgumentParser

import model_utils
import plots
import train_loop
from training import study
from training.config import TrainConfig, validate_config
from training.errors import UsageError, exit_on_usage_error
from training.explain import N_STEPS, Explainer


# -----------------------------------------------------------------------------
# config: train_loop's flags plus one of our own


@dataclass
class InspectConfig:
    detail: Literal["blocks", "all"] = field(
        default="blocks", metadata={"help": "blocks: embeddings, attention/FFN halves, layers, pooler, head; "
                                            "all: every module with a forward"}
    )
    explain: Optional[str] = field(default=None, metadata={"help": "a review: explain the trained model's prediction for it "
                                                       "(Integrated Gradients, attention) instead of the walk-through"})
    model_dir: str = field(default="./fine-tuned-bert", metadata={"help": "with --explain: the trained model folder "
                                                                          "(train_loop.py's --final_model_dir)"})
    explain_class: str = field(default="", metadata={"help": "with --explain: the class whose scores are shown "
                                                             "(default: the predicted one)"})
    explain_n_steps: int = field(default=N_STEPS, metadata={"help": "with --explain: points on Integrated Gradients' "
                                                                  "path; more: a smaller convergence delta, slower"})
    explain_head: int = field(default=-1, metadata={"help": "with --explain: the attention head of the [CLS] map "
                                                            "(-1: the mean over heads)"})


def parse_config(argv=None):
    """TrainConfig's flags (one batch of training rows; no evaluation, no trackers) + InspectConfig."""
    parser = HfArgumentParser((TrainConfig, InspectConfig))
    try:
        cfg, inspect_cfg = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        raise UsageError(f"{err}. Run `python inspect_model.py --help` for every flag.") from None
    if inspect_cfg.explain is not None:
        return cfg, check_explain_config(inspect_cfg)  # a trained model and a text: no training flags apply
    cfg.eval_split, cfg.eval_strategy, cfg.report_to = "", "no", "none"
    # Enough rows for two classes in any seeded subset; tokenizing the full train split is not needed.
    cfg.max_train_samples = cfg.max_train_samples or max(64, cfg.per_device_train_batch_size)
    return validate_config(cfg), inspect_cfg


def check_explain_config(inspect_cfg):
    if inspect_cfg.explain_n_steps < 1:
        raise UsageError(f"--explain_n_steps must be at least 1, got {inspect_cfg.explain_n_steps}.")
    model_utils.check_model_dir(inspect_cfg.model_dir)
    return inspect_cfg


# -----------------------------------------------------------------------------
# setup: train_loop's own setup path, one batch


def setup(cfg):
    """(accelerator, prepared model, prepared AdamW, one training batch on the device, what is walked through).

    train_loop.build is what training itself calls: the same tokenizer, batches and model, with the
    same --attn_implementation and, on a CPU, the same speed-ups (training/cpu_speed.py).
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
# --explain: why a trained model said what it said


def explain_text(inspect_cfg, output_dir):
    """Print why --model_dir classified --explain as it did; write the two pictures. Returns the
    Explanation and the attention maps (layers, heads, T, T)."""
    model, tokenizer = model_utils.load_for_inference(inspect_cfg.model_dir)
    explainer = Explainer(model, tokenizer)
    try:
        classes = [inspect_cfg.explain_class] if inspect_cfg.explain_class else None
        explanation = explainer.explain(inspect_cfg.explain, classes=classes, n_steps=inspect_cfg.explain_n_steps)
    except ValueError as err:
        raise UsageError(f"--explain_class: {err}.") from None
    if not explanation.words:
        raise UsageError("--explain: the text has no words to explain; pass a review.")
    tokens, maps = explainer.attention(inspect_cfg.explain)
    head = inspect_cfg.explain_head
    if not -1 <= head < maps.shape[1]:
        raise UsageError(f"--explain_head must be -1 (the mean) or a head from 0 to {maps.shape[1] - 1}, got {head}.")
    cls_rows = (maps.mean(dim=1) if head == -1 else maps[:, head])[:, 0]  # (layers, T): [CLS]'s attention row
    shown = inspect_cfg.explain_class or explanation.label
    print(explanation_table(explanation, shown, model, inspect_cfg.model_dir))
    print()
    print(attention_table(tokens, cls_rows, "the mean over heads" if head == -1 else f"head {head}"))
    os.makedirs(output_dir, exist_ok=True)
    written = [
        plots.plot_word_attributions(explanation.words, explanation.attributions[shown],
                                     f"Integrated Gradients: each word's share of P({shown}) "
                                     f"(predicted {explanation.label}, {explanation.scores[explanation.label]:.3f})",
                                     os.path.join(output_dir, "explain_words.png")),
        plots.plot_cls_attention(tokens, cls_rows.tolist(), f"[CLS]'s attention per layer "
                                 f"({'mean over heads' if head == -1 else f'head {head}'})",
                                 os.path.join(output_dir, "explain_attention.png")),
    ]
    print(f"\nwrote {', '.join(written)}")
    return explanation, maps


def explanation_table(explanation, shown, model, model_dir):
    """The prediction, what the scores add up to, then every word in text order with its score."""
    others = ", ".join(f"{c} {p:.3f}" for c, p in explanation.scores.items() if c != explanation.label)
    change = explanation.scores[shown] - explanation.baseline_scores[shown]
    scores = explanation.attributions[shown]
    largest = max(map(abs, scores)) or 1.0
    lines = [f"EXPLAIN  {model_dir} ({type(model).__name__}, {model_utils.count_parameters(model):,} parameters): "
             f"predicted {explanation.label} {explanation.scores[explanation.label]:.3f} ({others})",
             f"  Integrated Gradients of P({shown}), {explanation.n_steps} steps, from a baseline of [PAD]s "
             f"(P({shown}) = {explanation.baseline_scores[shown]:.3f} there) to the text:",
             f"  the word scores add up to {sum(scores):+.4f} = P({shown}) - P({shown} | baseline) = {change:+.4f}, "
             f"convergence delta {explanation.deltas[shown]:.1e}"]
    if abs(explanation.deltas[shown]) > 0.05 * max(abs(change), 0.01):
        lines.append(f"  WARNING: the delta is over 5% of the change: the {explanation.n_steps} points miss part of "
                     f"the path's gradient; raise --explain_n_steps")
    if explanation.truncated:
        lines.append(f"  the text is longer than {explanation.max_length} tokens: only the first "
                     f"{explanation.max_length} ([CLS] and [SEP] included) are explained, as prediction cuts it")
    width = max(12, *(len(w.text) for w in explanation.words[:200]))
    lines += ["", f"{'word':<{width}} {'score':>8}"]
    for word, score in zip(explanation.words, scores):
        bar = ("+" if score > 0 else "-") * round(10 * abs(score) / largest)
        lines.append(f"{word.text:<{width}} {score:>+8.4f}  {bar}")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    lines += ["", f"  most for {shown}:     " + ", ".join(f"{explanation.words[i].text} {scores[i]:+.3f}" for i in order[::-1][:5]),
              f"  most against {shown}: " + ", ".join(f"{explanation.words[i].text} {scores[i]:+.3f}" for i in order[:5] if scores[i] < 0)]
    return "\n".join(lines)


def attention_table(tokens, cls_rows, heads):
    """Per layer, the five tokens [CLS] attends to most: where its attention went, not why."""
    lines = [f"ATTENTION  [CLS]'s attention row per layer ({heads}): the five tokens it attends to most"]
    for layer, row in enumerate(cls_rows.tolist()):
        top = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:5]
        lines.append(f"  layer {layer}  " + "  ".join(f"{tokens[i]} {row[i]:.2f}" for i in top))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    with exit_on_usage_error():
        cfg, inspect_cfg = parse_config(argv)
        if inspect_cfg.explain is not None:
            return explain_text(inspect_cfg, cfg.output_dir)
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
