"""The model card (training/model_card.py): README.md in the folder for serving and in each
checkpoint, read back with huggingface_hub as the Hub reads it."""

import json
import shutil

import transformers
from huggingface_hub import ModelCard

import train_loop
from conftest import read_records, train_args
from training.model_card import dataset_id, hub_model_id

FLAGS = ("--num_train_epochs", "2", "--plots", "false", "--learning_rate", "3e-4", "--warmup_steps", "2",
         "--seed", "7")  # 64 rows, batch 8: 8 steps an epoch, an evaluation and a checkpoint after each


def metrics_of(card):
    return {(r.metric_type, r.dataset_type, r.dataset_split): r.metric_value for r in card.data.eval_results}


def test_the_served_model_and_each_checkpoint_carry_a_card_the_hub_reads(tiny_bert, csv_data, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)  # a local copy of a Hub model, as save_pretrained in transformers 4 left it
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "prajjwal1/bert-tiny"}))
    train_loop.main(train_args(str(base), csv_data, tmp_path, *FLAGS))

    card = ModelCard.load(tmp_path / "model" / "README.md")
    final = json.loads((tmp_path / "results" / "eval_results.json").read_text())
    dataset = dataset_id(csv_data)
    assert card.data.base_model == "prajjwal1/bert-tiny"
    assert card.data.datasets == [dataset] and card.data.pipeline_tag == "text-classification"
    assert card.data.label_names == ["negative", "positive"]  # the csv's class names, in index order
    assert metrics_of(card) == {(metric, dataset, "test"): final[f"eval_{metric}"]
                                for metric in ("accuracy", "f1", "precision", "recall", "loss")}
    for line in ("- learning_rate: 0.0003", "- train_batch_size: 8", "- total_train_batch_size: 8", "- seed: 7",
                 "- num_epochs: 2.0", "- lr_scheduler_warmup_steps: 2", "- weight_decay: 0.01",
                 "- mixed_precision: no", "- num_devices: 1", f"- Transformers {transformers.__version__}"):
        assert line in card.text, line

    # Each checkpoint: its own card, with the evaluation of its own step, listed in its manifest.
    evaluations = {r["step"]: r for r in read_records(tmp_path) if "eval_accuracy" in r}
    for step in (8, 16):
        folder = tmp_path / "results" / f"checkpoint-{step}"
        checkpoint_card = ModelCard.load(folder / "README.md")
        assert checkpoint_card.data.model_name == f"checkpoint-{step}"
        assert metrics_of(checkpoint_card)[("accuracy", dataset, "test")] == evaluations[step]["eval_accuracy"]
        assert "README.md" in json.loads((folder / "checkpoint_manifest.json").read_text())["files"]


def test_a_run_without_evaluation_has_a_card_without_results(tiny_bert, csv_data, tmp_path):
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "2", "--eval_strategy", "no",
                               "--eval_split", "", "--save_strategy", "no", "--plots", "false"))
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None  # a local folder with no Hub id
    assert f"a local model ({tiny_bert})" in card.text and "- training_steps: 2" in card.text


def test_what_counts_as_a_hub_id(tmp_path):
    assert hub_model_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_model_id("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert hub_model_id(str(tmp_path / "missing" / "..")) is None  # a path, not an id
    assert dataset_id("stanfordnlp/imdb") == "stanfordnlp/imdb"
    assert dataset_id("../shared/data/imdb") == "imdb"  # a local folder: its name
    assert dataset_id("train=data/a.csv,test=data/b.csv") == "a"
