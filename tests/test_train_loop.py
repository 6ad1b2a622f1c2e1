"""The training loop, checked by value: schedule, logged numbers, learning, resume, saving."""

import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, get_scheduler, pipeline

import model_utils
import train_loop
from training import checkpoints, runlog
from conftest import (assert_same_weights, crash_then_resume, make_reviews, read_records, reset_accelerate,
                      train_args, usage_error, without_timings)
from models import save_tiny_bert


def run(tiny_bert, data, out, *extra):
    """Train in this process; return the final eval results and the log records."""
    final = train_loop.main(train_args(tiny_bert, data, out, *extra))
    return final, read_records(out)


def train_logs(records):
    return [r for r in records if "loss" in r]


def weights(out):
    return load_file(f"{out}/model/model.safetensors")


# -----------------------------------------------------------------------------
# config


def test_defaults_are_the_seeds_training_arguments():
    cfg = train_loop.parse_config([])
    assert (cfg.output_dir, cfg.logging_dir, cfg.final_model_dir) == ("./results", "./logs", "./fine-tuned-bert")
    assert (cfg.eval_strategy, cfg.save_strategy, cfg.logging_steps) == ("epoch", "epoch", 500)
    assert (cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size, cfg.num_train_epochs) == (8, 8, 3)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.max_grad_norm) == (5e-5, 0.01, 0, 1.0)
    assert (cfg.model_name_or_path, cfg.dataset_name, cfg.max_length) == ("bert-base-uncased", "imdb", 512)


def test_old_evaluation_strategy_flag_is_an_alias(capsys):
    cfg = train_loop.parse_config(["--evaluation_strategy", "steps", "--eval_steps", "7"])
    assert (cfg.eval_strategy, cfg.eval_steps) == ("steps", 7)
    assert "old name of --eval_strategy" in capsys.readouterr().out


def test_config_from_json_and_yaml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 2e-5, "warmup_steps": 0.1}))
    (tmp_path / "c.yaml").write_text("num_train_epochs: 1\nlr_scheduler_type: cosine\n")
    assert train_loop.parse_config([str(tmp_path / "c.json")]).warmup_steps == 0.1
    assert train_loop.parse_config([str(tmp_path / "c.yaml")]).lr_scheduler_type == "cosine"


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1e-4"], "unknown argument: --learning_rat (did you mean --learning_rate?)"),
    (["--eval_strategy", "sometimes"], "invalid choice"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
    (["--warmup_steps", "2.5"], "whole number of steps or a fraction"),
    (["--lr_scheduler_type", "zigzag"], "--lr_scheduler_type 'zigzag' is unknown"),
    (["--resume_from_checkpoint", "latest", "--output_dir", "/nonexistent"], "no checkpoint-* folder"),
    (["--eval_split", ""], "also pass --eval_strategy no"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    assert message in usage_error(train_loop.main, argv, capsys)


# -----------------------------------------------------------------------------
# schedule and logged numbers


def test_seed_run_logs_the_seeds_rate_and_epoch_at_step_500():
    """IMDb: 25,000 rows, batch 8, 3 epochs, one process -> 3,125 steps per epoch, 9,375 in all."""
    cfg = train_loop.parse_config([])
    per_epoch, total, warmup, epochs = train_loop.schedule_lengths(cfg, num_batches=25_000 // 8)
    assert (per_epoch, total, warmup, epochs) == (3125, 9375, 0, 3)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(499):  # steps 1..499 each advance the schedule once; step 500 uses the rate after that
        optimizer.step()
        scheduler.step()
    progress = checkpoints.Progress(global_step=500, window_loss=213.85, window_steps=500)
    record = runlog.log_record(progress, grad_norm=4.4931, learning_rate=optimizer.param_groups[0]["lr"],
                                   steps_per_epoch=per_epoch)
    assert str(record) == "{'loss': 0.4277, 'grad_norm': 4.493, 'learning_rate': 4.734e-05, 'epoch': 0.16}"


def test_warmup_fraction_and_accumulation_lengths():
    cfg = train_loop.parse_config(["--warmup_steps", "0.1", "--gradient_accumulation_steps", "4",
                                   "--num_train_epochs", "2"])
    # 10 micro-batches -> 3 optimizer steps per epoch (the last one from 2 micro-batches)
    assert train_loop.schedule_lengths(cfg, num_batches=10) == (3, 6, 1, 2)


def test_logged_rate_and_epoch_follow_the_formula(tiny_bert, csv_data, tmp_path):
    """64 rows / batch 8 = 8 steps per epoch, 2 epochs, 4 warm-up steps, logs every 3 steps."""
    _, records = run(tiny_bert, csv_data, tmp_path, "--num_train_epochs", "2", "--logging_steps", "3",
                     "--warmup_steps", "4", "--learning_rate", "1e-3")
    logs = train_logs(records)
    total, warmup, lr = 16, 4, 1e-3
    assert [r["step"] for r in logs] == [3, 6, 9, 12, 15]
    for r in logs:
        used = r["step"] - 1  # scheduler steps taken before this step's update
        expected = lr * used / warmup if used < warmup else lr * (total - used) / (total - warmup)
        assert r["learning_rate"] == pytest.approx(expected, rel=1e-3)
        assert r["epoch"] == round(r["step"] / 8, 2)
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0


def test_logged_loss_is_the_mean_over_the_window(tiny_bert, csv_data, tmp_path):
    every_step = train_logs(run(tiny_bert, csv_data, tmp_path / "a", "--num_train_epochs", "1",
                                "--logging_steps", "1")[1])
    every_4 = train_logs(run(tiny_bert, csv_data, tmp_path / "b", "--num_train_epochs", "1",
                             "--logging_steps", "4")[1])
    losses = [r["loss"] for r in every_step]
    assert len(losses) == 8 and [r["step"] for r in every_4] == [4, 8]
    for record, window in zip(every_4, (losses[:4], losses[4:])):
        assert record["loss"] == pytest.approx(sum(window) / 4, abs=2e-4)  # inputs rounded to 4 places
    assert every_4[1]["grad_norm"] == every_step[7]["grad_norm"]  # the norm of the window's last step


def test_grad_norm_is_measured_before_clipping(tiny_bert, csv_data, tmp_path):
    flags = ("--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--eval_strategy", "no")
    clipped = train_logs(run(tiny_bert, csv_data, tmp_path / "a", *flags, "--max_grad_norm", "0.001")[1])
    free = train_logs(run(tiny_bert, csv_data, tmp_path / "b", *flags, "--max_grad_norm", "0")[1])
    # Same weights before step 1, so the same gradient: the log shows its norm, not the clipped 0.001.
    assert clipped[0]["grad_norm"] == free[0]["grad_norm"] > 0.01
    # Clipping did happen: after a 0.001-norm update the second step's gradient differs from the free run's.
    assert clipped[1]["grad_norm"] != free[1]["grad_norm"]


def test_weight_decay_skips_biases_and_layernorm(tiny_bert):
    model = model_utils.load_model(tiny_bert, ["negative", "positive"])
    decay, no_decay = model_utils.optimizer_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert "bert.embeddings.word_embeddings.weight" in decay_names
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay_names
    assert "classifier.weight" in decay_names
    # 2 layers x (q, k, v, attn-out, ffn-in, ffn-out) + 3 embeddings + pooler + classifier
    assert len(decay_names) == 2 * 6 + 3 + 1 + 1


# -----------------------------------------------------------------------------
# it learns, and what it saves serves


def test_overfits_a_handful_of_examples(tiny_bert, csv_data, tmp_path):
    final, _ = run(tiny_bert, csv_data, tmp_path, "--eval_split", "train", "--max_train_samples", "16",
                   "--max_eval_samples", "16", "--num_train_epochs", "25", "--learning_rate", "5e-3",
                   "--logging_steps", "10", "--save_strategy", "no", "--eval_strategy", "no")
    assert final["eval_accuracy"] >= 0.95
    assert final["eval_loss"] < 0.2


def test_saved_model_serves_label_names_in_pipeline(tiny_bert, csv_data, tmp_path):
    final, records = run(tiny_bert, csv_data, tmp_path, "--num_train_epochs", "1", "--save_strategy", "no")
    classify = pipeline("text-classification", model=str(tmp_path / "model"), top_k=None)
    scores = classify(["a great and wonderful film"])[0]  # a list in, one list of scores per text out
    assert {s["label"] for s in scores} == {"negative", "positive"}  # the csv's label names, sorted
    assert sum(s["score"] for s in scores) == pytest.approx(1.0)
    with open(tmp_path / "results" / "eval_results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(final))
    assert saved["eval_samples"] == 40 and sum(map(sum, saved["confusion_matrix"])) == 40
    summary = records[-1]
    assert summary["epoch"] == 1.0 and summary["train_loss"] > 0 and summary["train_samples_per_second"] > 0


def test_parquet_files_with_integer_labels(tiny_bert, parquet_data, tmp_path):
    final, _ = run(tiny_bert, parquet_data, tmp_path, "--num_train_epochs", "1", "--save_strategy", "no")
    model, _ = model_utils.load_for_inference(str(tmp_path / "model"))
    assert model_utils.label_names(model) == ["0", "1"]
    assert final["eval_samples"] == 40


def test_bf16_autocast_on_cpu(tiny_bert, csv_data, tmp_path):
    """The mixed-precision path in CI: bf16 autocast, batches padded to multiples of 8."""
    _, records = run(tiny_bert, csv_data, tmp_path, "--mixed_precision", "bf16", "--num_train_epochs", "1",
                     "--logging_steps", "2", "--save_strategy", "no")
    logs = train_logs(records)
    assert len(logs) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logs)
    from data import build_collator
    from transformers import AutoTokenizer

    collate = build_collator(AutoTokenizer.from_pretrained(tiny_bert), "bf16")
    batch = collate([{"input_ids": [2, 5, 6, 3]}, {"input_ids": [2, 5, 6, 7, 8, 9, 10, 11, 12, 3]}])
    assert batch["input_ids"].shape == (2, 16)


def test_tensorboard_events_are_written_one_folder_per_run(tiny_bert, csv_data, tmp_path):
    flags = ("--num_train_epochs", "1", "--logging_steps", "2", "--save_strategy", "no",
             "--report_to", "tensorboard")  # the last flag wins over train_args' --report_to none
    run(tiny_bert, csv_data, tmp_path, *flags)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "logs").iterdir()  # logging_dir/<run_name>, named by date, time and host
    assert re.fullmatch(r"[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d\.\d{3}_.+", run_dir.name)
    events = EventAccumulator(str(run_dir)).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert losses == pytest.approx([r["loss"] for r in train_logs(read_records(tmp_path))], abs=1e-4)
    assert [e.step for e in events.Scalars("eval/accuracy")] == [8]
    reset_accelerate()
    run(tiny_bert, csv_data, tmp_path, *flags, "--run_name", "second")  # a second run: a folder of its own
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted([run_dir.name, "second"])
    assert len(EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")) == 4  # the first run's, untouched


# -----------------------------------------------------------------------------
# checkpoints and resume


def test_resume_mid_epoch_equals_an_uninterrupted_run(tiny_bert, csv_data, tmp_path, monkeypatch):
    flags = ("--num_train_epochs", "2", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "5",
             "--learning_rate", "1e-3", "--eval_strategy", "epoch")
    _, straight = run(tiny_bert, csv_data, tmp_path / "straight", *flags)

    resumed = tmp_path / "resumed"
    # killed after checkpoint-5, with steps 6 and 7 logged: the resume drops and redoes those
    written = crash_then_resume(tiny_bert, csv_data, resumed, flags, crash_at_step=7, monkeypatch=monkeypatch)
    assert [r["step"] for r in train_logs(written)] == [2, 4, 6]
    assert without_timings(read_records(resumed)) == without_timings(straight)
    assert_same_weights(resumed, tmp_path / "straight")


def test_checkpoints_are_atomic_and_limited(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "results"
    run(tiny_bert, csv_data, tmp_path, "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "3",
        "--save_total_limit", "2")
    # Every 3 steps, and at the last (16), as in Trainer 5; the newest two stay.
    assert sorted(os.listdir(out)) == ["checkpoint-15", "checkpoint-16", "confusion_matrix.png", "eval_results.json",
                                       "log_history.jsonl", "training_curves.png"]  # pictures: --plots, on by default
    ckpt = out / "checkpoint-16"
    with open(ckpt / "training_state.json") as f:
        assert json.load(f)["global_step"] == 16
    with open(ckpt / "train_config.json") as f:
        assert json.load(f)["save_steps"] == 3
    # A save interrupted half-way leaves only a tmp- folder, which `latest` never picks.
    shutil.copytree(ckpt, out / "tmp-checkpoint-99")
    assert checkpoints.resolve_checkpoint("latest", str(out)) == str(ckpt)


def test_resume_with_a_different_batch_size_is_refused(tiny_bert, csv_data, tmp_path, capsys):
    run(tiny_bert, csv_data, tmp_path, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3")
    reset_accelerate()
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "6",
                                                  "--per_device_train_batch_size", "4",
                                                  "--resume_from_checkpoint", "latest"), capsys)
    assert "per_device_train_batch_size: 8 -> 4" in err


def test_accumulation_is_exact_with_a_short_last_window(tmp_path):
    """Batch 8 x accumulation 2 == batch 16 x accumulation 1 on the same rows, dropout off.

    76 rows: ten micro-batches of 8 (the last holds 4) make windows of 16, 16, 16, 16 and 12 rows;
    batch 16 gives the same five steps. The last window's gradient must be its 12 rows' mean, not
    half a 16-row step or a plain average of an 8-row and a 4-row mean.
    """
    model = str(save_tiny_bert(tmp_path / "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    folder = tmp_path / "reviews"
    folder.mkdir()
    make_reviews(76, seed=7).to_csv(folder / "train.csv", index=False)
    make_reviews(16, seed=8).to_csv(folder / "test.csv", index=False)
    runs = {}
    for batch, accumulation in ((8, 2), (16, 1)):
        out = tmp_path / f"{batch}x{accumulation}"
        reset_accelerate()
        train_loop.main(train_args(model, str(folder), out, "--per_device_train_batch_size", str(batch),
                                   "--gradient_accumulation_steps", str(accumulation), "--no_group_by_length",
                                   "--num_train_epochs", "1", "--logging_steps", "1", "--learning_rate", "1e-3",
                                   "--eval_strategy", "no", "--save_strategy", "no", "--plots", "false"))
        runs[batch] = ([r for r in read_records(out) if "loss" in r], load_file(f"{out}/model/model.safetensors"))
    (steps_a, weights_a), (steps_b, weights_b) = runs[8], runs[16]
    assert len(steps_a) == len(steps_b) == 5
    for a, b in zip(steps_a, steps_b):
        assert a["learning_rate"] == b["learning_rate"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-6) for k in weights_a)


def test_checkpoints_are_model_folders_and_old_ones_still_resume(tiny_bert, csv_data, tmp_path):
    """from_pretrained and pipeline() read checkpoint-N as Trainer's; a checkpoint written before
    (our settings in config.json, no tokenizer) resumes too."""
    flags = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no")
    run(tiny_bert, csv_data, tmp_path, *flags)
    ckpt = tmp_path / "results" / "checkpoint-3"
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)  # loaded, not initialised
    predicted = pipeline("text-classification", model=str(ckpt))(["great wonderful film", "awful boring mess"])
    assert {p["label"] for p in predicted} <= {"negative", "positive"}

    old = tmp_path / "old"
    shutil.copytree(tmp_path / "results", old / "results")
    old_ckpt = old / "results" / "checkpoint-3"
    (old_ckpt / "train_config.json").replace(old_ckpt / "config.json")  # the layout before this change
    (old_ckpt / checkpoints.MANIFEST).unlink()  # which had no manifest either
    for name in os.listdir(old_ckpt):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(old_ckpt / name)
    reset_accelerate()
    run(tiny_bert, csv_data, old, *flags, "--resume_from_checkpoint", str(old_ckpt))
    assert without_timings(train_logs(read_records(old))) == without_timings(train_logs(read_records(tmp_path)))
