"""One real fine-tune: MiniLM-L6 (a pretrained BERT, bert-base-uncased's vocabulary) on real IMDb reviews."""

import json

import pytest
from transformers import pipeline

import train_loop
from conftest import read_records
from models import IMDB, MINILM


@pytest.mark.skipif(not MINILM.exists(), reason="needs ../shared/models/minilm-l6")
def test_minilm_learns_imdb_sentiment(tmp_path):
    final = train_loop.main([
        "--model_name_or_path", str(MINILM), "--dataset_name", str(IMDB),
        "--max_train_samples", "1024", "--max_eval_samples", "500", "--max_length", "128",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "1e-4",
        "--num_train_epochs", "1", "--logging_steps", "16", "--save_strategy", "no", "--report_to", "none",
        "--output_dir", str(tmp_path / "results"), "--final_model_dir", str(tmp_path / "model"),
    ])
    # From 50% (a random head) to well above chance in one short epoch: measured 0.804 here
    # (seed 43: 0.802; with --fast_dropout false 0.810 and 0.798, the same within noise).
    assert final["eval_accuracy"] >= 0.73
    assert final["eval_samples"] == 500
    losses = [r["loss"] for r in read_records(tmp_path) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0] < 0.75
    classify = pipeline("text-classification", model=str(tmp_path / "model"))
    assert classify("A wonderful, moving film. I loved every minute of it.")[0]["label"] == "pos"
    assert classify("Dull, boring and far too long. A waste of time.")[0]["label"] == "neg"
    with open(tmp_path / "results" / "eval_results.json") as f:
        assert json.load(f)["eval_accuracy"] == final["eval_accuracy"]
