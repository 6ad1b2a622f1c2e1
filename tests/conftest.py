"""Fixtures: a tiny random BERT with its own small vocabulary, and tiny sentiment data on disk.

Everything is built offline, in seconds (the builders and the ../shared paths are in models.py);
the real-weights tests use ../shared instead.
"""

import os
import random
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pandas as pd
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from models import MINILM, NEGATIVE, NEUTRAL, POSITIVE, ROOT, save_minilm_classifier, save_served_tiny_bert, save_tiny_bert


def make_reviews(n, seed):
    """n short reviews, half positive, half negative, labelled 'positive'/'negative'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words[: rng.randint(3, 6)] + words[4:]),
                     "label": "positive" if positive else "negative"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A bare 2-layer encoder, like a pretrained checkpoint: training gives it a fresh head."""
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny classifier the serving tests serve (WordPiece vocabulary, labels neg/pos)."""
    return save_served_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", max_length=64)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory):
    """minilm-l6's real encoder with a seeded 2-label head, saved as a fine-tuned model folder."""
    if not MINILM.is_dir():
        pytest.skip(f"{MINILM} is missing (the shared test model)")
    return save_minilm_classifier(tmp_path_factory.mktemp("minilm") / "model")


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory):
    """A folder with train.csv (64 rows) and test.csv (40 rows): load_dataset(folder) finds both splits."""
    folder = tmp_path_factory.mktemp("reviews-csv")
    make_reviews(64, seed=1).to_csv(folder / "train.csv", index=False)
    make_reviews(40, seed=2).to_csv(folder / "test.csv", index=False)
    return str(folder)


@pytest.fixture(scope="session")
def parquet_data(tmp_path_factory):
    """train=...,test=... parquet files with integer labels (1 = positive)."""
    folder = tmp_path_factory.mktemp("reviews-parquet")
    for split, n, seed in (("train", 64, 3), ("test", 40, 4)):
        df = make_reviews(n, seed)
        df["label"] = (df["label"] == "positive").astype("int64")
        df.to_parquet(folder / f"{split}.parquet")
    return f"train={folder / 'train.parquet'},test={folder / 'test.parquet'}"


def train_args(model, dataset, out, *extra):
    """Flags for a quick CPU run writing everything under `out`."""
    return [
        "--model_name_or_path", model, "--dataset_name", dataset,
        "--output_dir", f"{out}/results", "--logging_dir", f"{out}/logs",
        "--final_model_dir", f"{out}/model", "--report_to", "none", "--max_length", "32",
        *extra,
    ]


def reset_accelerate():
    """Accelerate keeps its state in process-wide singletons; a new run in this process needs them clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def free_port():
    """A TCP port on loopback that nothing listens on now, for a server the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(args, port, log_path, env=None, timeout=90):
    """Run `python <args>` (a server listening on `port`) from the repository root; yield its base URL
    once GET /health answers 200. Its output goes to `log_path` and into the failure message."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w+") as log:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while not answers_health(url):
                if time.monotonic() > deadline or process.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server not ready (exit code {process.poll()}):\n{log.read()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def answers_health(url):
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def usage_error(main, argv, capsys):
    """Run a command-line `main(argv)` that must refuse its input: exit code 2, no traceback.
    Returns what it wrote to stderr, for the caller's own checks on the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def read_records(out):
    """The run's log records (log_history.jsonl) as a list of dicts."""
    import json

    with open(f"{out}/results/log_history.jsonl") as f:
        return [json.loads(line) for line in f]


TIMING_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
               "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def crash_then_resume(model, dataset, out, flags, crash_at_step, monkeypatch):
    """Train with `flags` into `out`, die right after step `crash_at_step`, then resume from the latest
    checkpoint in a fresh run. Returns the log records the crashed run had written."""
    import train_loop

    real_after_step = train_loop.after_step

    def after_step_then_crash(run, *args):
        real_after_step(run, *args)
        if run.progress.global_step == crash_at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "after_step", after_step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_loop.main(train_args(model, dataset, out, *flags))
    written_before_crash = read_records(out)
    monkeypatch.setattr(train_loop, "after_step", real_after_step)
    reset_accelerate()
    train_loop.main(train_args(model, dataset, out, *flags, "--resume_from_checkpoint", "latest"))
    return written_before_crash


def assert_same_weights(out_a, out_b):
    """The two runs' saved models are equal bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(f"{out_a}/model/model.safetensors"), load_file(f"{out_b}/model/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def pydantic_says(type_, value):
    """The installed pydantic's own message for `value` as `type_`: what the app passes on after the
    location it names (serve/app.py's describe_validation_errors), so that the location is ours to check."""
    try:
        TypeAdapter(type_).validate_python(value)
    except ValidationError as err:
        return err.errors()[0]["msg"]
    raise AssertionError(f"pydantic accepts {value!r} as {type_}")
