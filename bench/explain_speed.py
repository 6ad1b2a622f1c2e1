"""What an explanation costs, and how well it converges, against Integrated Gradients' step count.

    python -m bench.explain_speed --model_dir fine-tuned-bert      # a model trained as the README shows
    python -m bench.explain_speed --model_dir fine-tuned-bert --steps 16 32 64 128 --reviews 6

For a few IMDb test reviews (the first of each length bucket: short, typical, long) it explains
the predicted class at each step count and prints the seconds and the convergence: Captum's delta
as a share of the change it should add up to, |delta| / |P(x) - P(baseline)|. The median of
--repeats runs per cell (the machine is noisy). BENCHMARKS.md records a run.
"""

import argparse
import statistics
import time

import pandas as pd
import torch

from training.explain import Explainer
from model_utils import load_for_inference

IMDB_TEST = "../shared/data/imdb/plain_text/test-00000-of-00001.parquet"
BUCKETS = ((20, 64), (150, 250), (480, 100_000))  # tokens: a short review, a typical one, one cut at 512


def pick_reviews(explainer, per_bucket):
    texts = pd.read_parquet(IMDB_TEST).text.tolist()
    chosen = []
    for low, high in BUCKETS:
        inside = [t for t in texts[:2000] if low <= len(explainer.core.encode(t).ids) < high]
        chosen += inside[:per_bucket]
    return chosen


def measure(explainer, text, n_steps, repeats):
    label = explainer.explain(text, n_steps=4).label
    seconds, explanation = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        explanation = explainer.explain(text, n_steps=n_steps, classes=[label])
        seconds.append(time.perf_counter() - started)
    change = explanation.scores[label] - explanation.baseline_scores[label]
    return statistics.median(seconds), abs(explanation.deltas[label]) / max(abs(change), 1e-6)


def table(header, rows):
    """A Markdown table, as BENCHMARKS.md records it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default="fine-tuned-bert")
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--reviews", type=int, default=1, help="reviews per length bucket")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_for_inference(args.model_dir)
    explainer = Explainer(model, tokenizer)
    print(f"{args.model_dir}: {torch.get_num_threads()} threads, one class explained per review "
          f"(two cost the same: explain.py derives the second)")
    rows = []
    for text in pick_reviews(explainer, args.reviews):
        tokens = len(explainer.encode(text)[0].ids)
        for n_steps in args.steps:
            seconds, miss = measure(explainer, text, n_steps, args.repeats)
            rows.append([tokens, n_steps, f"{seconds:.2f}", f"{miss:.1%}"])
    print(table(["tokens", "n_steps", "seconds (median)", "|delta| / |change|"], rows))


if __name__ == "__main__":
    main()
