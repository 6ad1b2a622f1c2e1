"""Pictures of a finished run, drawn from the files it wrote into output_dir:

    training_curves.png    loss, learning rate and gradient norm against step; eval accuracy per epoch
    confusion_matrix.png   the final evaluation's counts (rows: true class, columns: predicted)
    layer_grad_norms.png   with --log_layer_grad_norms: each layer's gradient norm and update/weight ratio

    python plots.py results/                       # redraw them for any finished run

and the two pictures of one explanation (inspect_model.py --explain, training/explain.py):

    explain_words.png      the text, each word coloured by its attribution to one class
    explain_attention.png  where [CLS] looks in each layer: its attention row, mean over heads

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


# -----------------------------------------------------------------------------
# one explanation


def plot_word_attributions(words, scores, title, path, width_in=11.0, fontsize=9):
    """The text as a page of words, each on a box coloured by its score: blue for, red against
    (matplotlib's RdBu, readable with the common colour-blindnesses), the colour bar the legend.

    Monospace text, so that a word's place on its line is its character count: DejaVu Sans Mono's
    characters are 0.602 em wide, which fixes how many fit in the axes' width. No text measuring.
    """
    chars_per_line = int(0.96 * width_in * 72 / (0.602 * fontsize))
    lines = wrap([w.text for w in words], chars_per_line)
    line_in = 1.6 * fontsize / 72
    text_in = line_in * (len(lines) + 0.5)
    height_in = text_in + 1.3  # the title above, the colour bar below
    fig = Figure(figsize=(width_in, height_in))
    ax = fig.add_axes((0.02, 0.9 / height_in, 0.96, text_in / height_in))
    ax.set(xlim=(0, chars_per_line), ylim=(len(lines) - 0.25, -0.75))
    ax.axis("off")
    fig.suptitle(title, y=1 - 0.12 / height_in, va="top", fontsize=11)
    limit = max(map(abs, scores), default=0) or 1.0
    cmap = matplotlib.colormaps["RdBu"]
    norm = matplotlib.colors.Normalize(-limit, limit)
    for row, line in enumerate(lines):
        for column, index in line:
            ax.text(column, row, words[index].text, family="DejaVu Sans Mono", fontsize=fontsize, va="center",
                    parse_math=False,  # a review's "$5 ... $10" is text, not mathtext
                    bbox={"facecolor": cmap(norm(scores[index])), "edgecolor": "none", "pad": 1.2})
    bar = fig.add_axes((0.3, 0.45 / height_in, 0.4, 0.12 / height_in))
    fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), cax=bar, orientation="horizontal",
                 label="attribution: the word's share of the class probability's rise over the baseline")
    fig.savefig(path, dpi=100)
    return path


def wrap(texts, width):
    """Lines of (column, index) for `texts` laid out left to right, one space apart, `width` wide."""
    lines, line, column = [], [], 0
    for index, text in enumerate(texts):
        if line and column + len(text) > width:
            lines.append(line)
            line, column = [], 0
        line.append((column, index))
        column += len(text) + 1
    return lines + [line] if line else lines


def plot_cls_attention(tokens, cls_rows, title, path):
    """A heat map, layers (rows) by tokens (columns): how much [CLS], whose final state the
    classifier reads, attends to each token in each layer. cls_rows is (layers, tokens)."""
    fig = Figure(figsize=(min(4 + 0.22 * len(tokens), 40), 3.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cls_rows, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="attention weight")
    ax.set(yticks=range(len(cls_rows)), yticklabels=[f"layer {i}" for i in range(len(cls_rows))], title=title)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    for label in ax.get_xticklabels():
        label.set_parse_math(False)  # tokens such as "$" are text
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":
    for written in plot_run(sys.argv[1] if len(sys.argv) > 1 else "./results"):
        print(f"wrote {written}")
