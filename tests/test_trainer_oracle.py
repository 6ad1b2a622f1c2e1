"""transformers.Trainer as the oracle: the same run through Trainer and through train_loop.py.

A tiny BERT without dropout (dropout is the one random stream the two loops draw differently), the
same rows, seed and settings, plain shuffled batches and torch's own dropout code path. Then every
logged loss, gradient norm and learning rate, every evaluation and the final weights agree: what
train_loop.py writes out by hand is what Trainer does. A change on either side shows up here.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

import data
import model_utils
import train_loop  # noqa: F401 (the loop under test, through our_run)
from conftest import read_records, reset_accelerate, train_args
from training.metrics import ClassificationMetrics
from models import save_tiny_bert

SETTINGS = dict(per_device_train_batch_size=8, per_device_eval_batch_size=8, num_train_epochs=2, learning_rate=1e-3,
                weight_decay=0.01, warmup_steps=2, logging_steps=1, eval_strategy="epoch", seed=42, max_grad_norm=1.0)


def trainer_run(model_dir, dataset, out, **extra):
    """Trainer on the same rows: our data.py tokenizes (the same ids), Trainer does everything else."""
    splits = data.load_splits(dataset, "train", "test")
    label_names = data.validate(splits, "text", "label")
    tokenizer = model_utils.load_tokenizer(model_dir)
    tokenized = {role: data.tokenize(ds, tokenizer, "text", "label", label_names, 32) for role, ds in splits.items()}
    torch.manual_seed(42)  # the fresh head is drawn from this seed, as train_loop.build does after set_seed
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    args = TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, train_sampling_strategy="random",
                             save_strategy=extra.pop("save_strategy", "no"), **{**SETTINGS, **extra})

    def compute_metrics(prediction):
        logits, labels = prediction
        return ClassificationMetrics(keep_in_memory=True).compute(predictions=logits.argmax(-1).tolist(),
                                                                   references=labels.tolist())

    trainer = Trainer(model=model, args=args, train_dataset=tokenized["train"], eval_dataset=tokenized["eval"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    trainer.train()
    return trainer.state.log_history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


def our_run(model_dir, dataset, out, *extra):
    flags = [item for key, value in SETTINGS.items() for item in (f"--{key}", str(value))]
    final = train_loop.main(train_args(model_dir, dataset, out, *flags, "--no_group_by_length", "--fast_dropout",
                                       "false", "--reuse_cpu_memory", "false", "--plots", "false", *extra))
    return read_records(out), load_file(f"{out}/model/model.safetensors"), final


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("no-dropout"), hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0))


def assert_same_run(trainer_logs, our_logs, trainer_weights, our_weights):
    theirs = [r for r in trainer_logs if "loss" in r]
    ours = [r for r in our_logs if "loss" in r]
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] and len(ours) == 16  # 2 epochs of 8 steps
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-3), a["step"]
    their_evals = [r for r in trainer_logs if "eval_loss" in r]
    our_evals = [r for r in our_logs if "eval_loss" in r]
    for a, b in zip(our_evals, their_evals):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
        assert a["eval_accuracy"] == b["eval_accuracy"]
    assert our_weights.keys() == trainer_weights.keys()
    for name in our_weights:
        assert torch.allclose(our_weights[name], trainer_weights[name], atol=1e-5), name


def test_same_logs_evaluations_and_weights_as_trainer(dropout_free_bert, csv_data, tmp_path):
    theirs, their_weights, _ = trainer_run(dropout_free_bert, csv_data, tmp_path / "trainer")
    reset_accelerate()
    ours, our_weights, _ = our_run(dropout_free_bert, csv_data, tmp_path / "ours")
    assert_same_run(theirs, ours, their_weights, our_weights)


def test_same_best_model_as_trainer(dropout_free_bert, csv_data, tmp_path):
    """--load_best_model_at_end (eval_loss, lower is better), checkpoints at each evaluation."""
    theirs, their_weights, trainer = trainer_run(dropout_free_bert, csv_data, tmp_path / "trainer",
                                                 save_strategy="epoch", load_best_model_at_end=True)
    reset_accelerate()
    ours, our_weights, final = our_run(dropout_free_bert, csv_data, tmp_path / "ours", "--save_strategy", "epoch",
                                       "--load_best_model_at_end", "true")
    assert_same_run(theirs, ours, their_weights, our_weights)
    assert trainer.state.best_metric == pytest.approx(final["eval_loss"], abs=1e-5)  # the best model, evaluated last
    with open(tmp_path / "ours" / "results" / "checkpoint-16" / "training_state.json") as f:
        ours_best = json.load(f)["best_checkpoint"]
    assert os.path.basename(ours_best) == os.path.basename(trainer.state.best_model_checkpoint)


def test_steps_strategies_also_evaluate_and_save_at_the_last_step_as_trainer_does(dropout_free_bert, csv_data, tmp_path):
    """16 steps, every 5: Trainer 5 evaluates and saves at 5, 10, 15, and at 16, the last."""
    every5 = dict(eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=5)
    theirs, their_weights, _ = trainer_run(dropout_free_bert, csv_data, tmp_path / "trainer", **every5)
    reset_accelerate()
    ours, our_weights, _ = our_run(dropout_free_bert, csv_data, tmp_path / "ours",
                                   *[item for key, value in every5.items() for item in (f"--{key}", str(value))])
    assert_same_run(theirs, ours, their_weights, our_weights)
    evaluated = lambda logs: [r["step"] for r in logs if "eval_loss" in r]  # noqa: E731
    assert evaluated(ours) == evaluated(theirs) == [5, 10, 15, 16]
    saved = lambda folder: sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))  # noqa: E731
    assert saved(tmp_path / "ours" / "results") == saved(tmp_path / "trainer") == [5, 10, 15, 16]
