"""Classify reviews from the command line, through the same batching worker as the web app.

    python -m serve.predict "A wonderful film." "Dull and far too long."
    python -m serve.predict --file reviews.txt                # one review per line
    cat reviews.txt | python -m serve.predict --file -        # from standard input
    python -m serve.predict --model_dir path/to/model "Great!"  # default: ./fine-tuned-bert

Prints one JSON object per review, in input order:
    {"label": "pos", "score": 0.97, "scores": {"neg": 0.03, "pos": 0.97}}
Reviews longer than the model's maximum are truncated, as in the web app.
"""

import argparse
import json
import sys
from collections import deque

from training.errors import UsageError, exit_on_usage_error
from model_utils import check_model_dir
from serve.batching import InputError, Limits, check_text
from serve.classifier import Classifier, softmax, to_prediction

IN_FLIGHT = 4  # chunks queued ahead of the one being printed: keeps the worker busy, memory bounded


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m serve.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", help="reviews to classify")
    parser.add_argument("--file", help="a UTF-8 text file with one review per line, or - for standard input")
    parser.add_argument("--model_dir", default="./fine-tuned-bert", help="a save_pretrained folder (safetensors)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="the weights' number format; default: float16 on a GPU, float32 on a CPU")
    args = parser.parse_args(argv)
    if bool(args.texts) == bool(args.file):
        raise UsageError("give reviews as arguments or --file PATH (one review per line), not both and not neither.")
    return args


def read_texts(args):
    """(texts, name of text i for error messages)."""
    if not args.file:
        return args.texts, lambda i: f"argument {i + 1}"
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--file {args.file!r}: cannot read it as UTF-8 text ({err}).") from None
    return lines, lambda i: f"line {i + 1} of {args.file}"


def check_all(texts, name, limits):
    """The web app's checks, before the model loads: a bad line fails in a second, not after loading."""
    if not texts:
        raise UsageError("there are no reviews to classify.")
    for i, text in enumerate(texts):
        try:
            check_text(text, limits, name(i))
        except InputError as err:
            raise UsageError(str(err)) from None


def predict_all(classifier, texts, chunk_size, out=None):
    """Queue chunks ahead, print each chunk's predictions as JSON lines, in input order."""
    out = out or sys.stdout
    pending = deque()
    for start in range(0, len(texts), chunk_size):
        pending.append(classifier.submit(texts[start : start + chunk_size]))
        if len(pending) > IN_FLIGHT:
            print_rows(pending.popleft().result(), classifier.labels, out)
    while pending:
        print_rows(pending.popleft().result(), classifier.labels, out)


def print_rows(rows, labels, out):
    for logits in rows:
        print(json.dumps(to_prediction(softmax(logits), labels), ensure_ascii=False), file=out, flush=True)


def main(argv=None):
    with exit_on_usage_error():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        limits = Limits(dtype=args.dtype)
        texts, name = read_texts(args)
        check_all(texts, name, limits)
        check_model_dir(args.model_dir)
        classifier = Classifier(args.model_dir, limits, args.device)
    with classifier:  # the worker finishes and stops, also if printing fails
        predict_all(classifier, texts, limits.max_inputs)


if __name__ == "__main__":
    main()
