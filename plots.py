"""Pictures of a finished run, drawn from the files it wrote into output_dir:

    training_curves.png    loss, learning rate and gradient norm against step; eval accuracy per epoch
    confusion_matrix.png   the final evaluation's counts (rows: true class, columns: predicted)
    layer_grad_norms.png   with --log_layer_grad_norms: each layer's gradient norm and update/weight ratio

    python plots.py results/                       # redraw them for any finished run

matplotlib's `Figure` + `savefig` without pyplot: no window, no display, no global figure
state, so it is safe on a headless server and inside a training process.
"""

import json
import os
import sys

import matplotlib
from matplotlib.figure import Figure


def plot_run(output_dir, label_names=None):
    """Every picture the run's files allow; returns the paths written."""
    written = []
    history = os.path.join(output_dir, "log_history.jsonl")
    if os.path.exists(history):
        written.append(plot_training_curves(read_jsonl(history), os.path.join(output_dir, "training_curves.png")))
    eval_path = os.path.join(output_dir, "eval_results.json")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            matrix = json.load(f).get("confusion_matrix")
        if matrix:
            path = os.path.join(output_dir, "confusion_matrix.png")
            written.append(plot_confusion_matrix(matrix, label_names or [str(i) for i in range(len(matrix))], path))
    layer_stats = os.path.join(output_dir, "layer_stats.jsonl")
    if os.path.exists(layer_stats) and os.path.getsize(layer_stats):
        written.append(plot_layer_stats(read_jsonl(layer_stats), os.path.join(output_dir, "layer_grad_norms.png")))
    return written


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(records, path):
    """Four panels from log_history records: the train log lines carry loss, learning_rate and
    grad_norm; the evaluation records carry eval_loss and eval_accuracy."""
    train = [r for r in records if "loss" in r and "learning_rate" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    steps = [r["step"] for r in train]
    fig = Figure(figsize=(10, 7), layout="constrained")
    (ax_loss, ax_lr), (ax_grad, ax_acc) = fig.subplots(2, 2)
    ax_loss.plot(steps, [r["loss"] for r in train], label="train (mean over each logging window)")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax_loss.set(title="loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax_loss.legend()
    ax_lr.plot(steps, [r["learning_rate"] for r in train])
    ax_lr.set(title="learning rate (the one each logged step used)", xlabel="optimizer step")
    ax_grad.plot(steps, [r["grad_norm"] for r in train])
    ax_grad.set(title="gradient norm before clipping", xlabel="optimizer step", ylabel="L2 norm")
    if evals:
        ax_acc.plot([r["epoch"] for r in evals], [r["eval_accuracy"] for r in evals], "o-")
        ax_acc.set(ylim=(0, 1))
    else:
        ax_acc.text(0.5, 0.5, "no evaluation in this run", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set(title="eval accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_lr, ax_grad, ax_acc):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=80)
    return path


def plot_confusion_matrix(matrix, label_names, path):
    """Counts with the label names; rows are the true class, columns the predicted one."""
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(label_names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=label_names, yticklabels=label_names,
           xlabel="predicted", ylabel="true", title=f"confusion matrix ({sum(map(sum, matrix))} rows)")
    threshold = max(max(row) for row in matrix) / 2
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.savefig(path, dpi=80)
    return path


def plot_layer_stats(records, path):
    """One line per layer, embeddings (dark) to classifier (light), on log scales: the norms of
    different layers differ by orders of magnitude."""
    layers = list(records[0]["grad_norm"])
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_grad, ax_ratio = fig.subplots(1, 2)
    colors = [matplotlib.colormaps["viridis"](i / max(len(layers) - 1, 1)) for i in range(len(layers))]
    for layer, color in zip(layers, colors):
        ax_grad.plot(steps, [r["grad_norm"][layer] for r in records], label=layer, color=color)
        ax_ratio.plot(steps, [r["update_ratio"][layer] or float("nan") for r in records], label=layer, color=color)
    ax_grad.set(title="gradient norm per layer (before clipping)", xlabel="optimizer step", yscale="log")
    ax_ratio.set(title="update / weight per layer (||Δw|| / ||w||)", xlabel="optimizer step", yscale="log")
    ax_ratio.legend(fontsize=7, ncol=2)
    for ax in (ax_grad, ax_ratio):
        ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=80)
    return path


if __name__ == "__main__":
    for written in plot_run(sys.argv[1] if len(sys.argv) > 1 else "./results"):
        print(f"wrote {written}")
