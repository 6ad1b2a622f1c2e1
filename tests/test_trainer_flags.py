"""TrainingArguments' flags, with Trainer's meaning: precision flags, logging and evaluation timing,
the best model and early stopping, run names, trackers, typos, and the smaller options."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import train_loop
from training import checkpoints, config
from conftest import read_records, reset_accelerate, train_args, usage_error

QUICK = ("--save_strategy", "no", "--plots", "false")


def records(tiny_bert, csv_data, out, *flags):
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, out, *flags))
    return read_records(out)


def without_timings(rows):
    return [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k} for r in rows]


# -----------------------------------------------------------------------------
# flags as Trainer spells them


def test_bf16_and_fp16_map_onto_mixed_precision(tiny_bert, csv_data, tmp_path, capsys):
    assert train_loop.parse_config(["--bf16", "True"]).mixed_precision == "bf16"
    assert train_loop.parse_config(["--fp16", "True"]).mixed_precision == "fp16"
    assert train_loop.parse_config(["--bf16", "True", "--mixed_precision", "bf16"]).mixed_precision == "bf16"
    trainer_style = records(tiny_bert, csv_data, tmp_path / "a", "--bf16", "True", "--max_steps", "3", *QUICK)
    assert "precision bf16" in capsys.readouterr().out
    accelerate_style = records(tiny_bert, csv_data, tmp_path / "b", "--mixed_precision", "bf16", "--max_steps", "3",
                               *QUICK)
    assert without_timings(trainer_style) == without_timings(accelerate_style)  # the same run
    assert "--bf16 and --fp16 both set" in usage_error(train_loop.main, ["--bf16", "True", "--fp16", "True"], capsys)
    err = usage_error(train_loop.main, ["--fp16", "True", "--mixed_precision", "bf16"], capsys)
    assert "--fp16 contradicts --mixed_precision bf16" in err


def test_a_mistyped_flag_names_the_closest_one(capsys):
    err = usage_error(train_loop.main, ["--learnin_rate", "1e-4"], capsys)
    assert "--learnin_rate (did you mean --learning_rate?)" in err


def test_every_flag_has_help_and_no_flags_do_not_repeat_it(capsys):
    parser = config.build_parser()
    helpless = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert helpless == []
    no_flag = next(a for a in parser._actions if "--no_group_by_length" in a.option_strings)
    assert no_flag.help == "the same as --group_by_length false"


def test_report_to_takes_lists_and_refuses_what_is_not_installed(capsys):
    assert train_loop.parse_config(["--report_to", "tensorboard", "mlflow"]).report_to == ["tensorboard", "mlflow"]
    assert train_loop.parse_config(["--report_to", "tensorboard, mlflow"]).report_to == ["tensorboard", "mlflow"]
    assert train_loop.parse_config(["--report_to", "none"]).report_to == []
    assert "--report_to tensorbord: unknown" in usage_error(train_loop.main, ["--report_to", "tensorbord"], capsys)
    err = usage_error(train_loop.main, ["--report_to", "tensorboard,wandb"], capsys)  # wandb is not installed here
    assert "--report_to wandb: not installed here, so nothing would be logged there" in err


def test_train_sampling_strategy_is_group_by_length():
    assert train_loop.parse_config(["--train_sampling_strategy", "random"]).group_by_length is False
    assert train_loop.parse_config(["--train_sampling_strategy", "group_by_length"]).group_by_length is True


# -----------------------------------------------------------------------------
# when to log and evaluate


def test_logging_first_step_eval_on_start_and_logging_per_epoch(tiny_bert, csv_data, tmp_path):
    rows = records(tiny_bert, csv_data, tmp_path / "first", "--num_train_epochs", "2", "--logging_steps", "100",
                   "--logging_first_step", "true", "--eval_on_start", "true", *QUICK)
    assert rows[0]["step"] == 0 and "eval_loss" in rows[0]  # the untrained head, evaluated before step 1
    first = next(r for r in rows if "loss" in r)
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 0.1  # a random head on two classes
    rows = records(tiny_bert, csv_data, tmp_path / "epoch", "--num_train_epochs", "2", "--logging_strategy", "epoch",
                   *QUICK)
    assert [r["step"] for r in rows if "loss" in r] == [8, 16]  # 64 rows, batch 8: one line per epoch
    assert [r["epoch"] for r in rows if "loss" in r] == [1.0, 2.0]


# -----------------------------------------------------------------------------
# the best model, early stopping


def test_best_model_is_the_best_evaluation_and_survives_the_checkpoint_limit(tiny_bert, csv_data, tmp_path, capsys):
    """Best = the highest eval_loss: certainly not the last evaluation of a run that learns."""
    out = tmp_path / "best"
    rows = records(tiny_bert, csv_data, out, "--max_steps", "8", "--eval_strategy", "steps", "--eval_steps", "2",
                   "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1", "--learning_rate",
                   "1e-3", "--load_best_model_at_end", "true", "--metric_for_best_model", "loss",
                   "--greater_is_better", "true", "--plots", "false")
    evals = [r for r in rows if "eval_loss" in r]
    best = max(evals[:-1], key=lambda r: r["eval_loss"])  # the last record is the final evaluation
    assert best["step"] < 8
    assert f"checkpoint-{best['step']}" in capsys.readouterr().out  # "loaded the best model ... from"
    assert sorted(os.listdir(out / "results")).count(f"checkpoint-{best['step']}") == 1  # kept despite the limit
    assert evals[-1]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)  # the final evaluation: the best's
    saved = load_file(out / "model" / "model.safetensors")
    at_best = load_file(out / "results" / f"checkpoint-{best['step']}" / "model.safetensors")
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)  # served: the best model


def test_save_strategy_best_saves_only_improvements(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "improvements"
    rows = records(tiny_bert, csv_data, out, "--max_steps", "8", "--eval_strategy", "steps", "--eval_steps", "2",
                   "--save_strategy", "best", "--learning_rate", "1e-3", "--plots", "false")
    best, improved = math.inf, []
    for r in [r for r in rows if "eval_loss" in r]:  # at steps 2, 4, 6, 8; the one at 8 is also the final one
        if r["eval_loss"] < best:
            best = r["eval_loss"]
            improved.append(r["step"])
    saved = sorted(int(n.split("-")[1]) for n in os.listdir(out / "results") if n.startswith("checkpoint-"))
    assert saved == sorted(set(improved)) and saved


def test_early_stopping_stops_after_patience_evaluations(tiny_bert, csv_data, tmp_path, capsys):
    rows = records(tiny_bert, csv_data, tmp_path / "early", "--num_train_epochs", "4", "--eval_strategy", "steps",
                   "--eval_steps", "1", "--learning_rate", "1e-3", "--early_stopping_patience", "2",
                   "--metric_for_best_model", "loss", "--greater_is_better", "true", *QUICK)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    # Stops at the second evaluation in a row that is not above the best so far.
    misses, best, stopped_at = 0, None, None
    for i, value in enumerate(evals):
        misses = 0 if best is None or value > best else misses + 1
        best = value if best is None or value > best else best
        if misses == 2:
            stopped_at = i + 1
            break
    assert stopped_at is not None and stopped_at < 32  # 4 epochs of 8 steps, evaluated at every step
    assert next(r for r in rows if "train_runtime" in r)["step"] == stopped_at
    assert "early stopping: eval_loss has not improved on" in capsys.readouterr().out


def test_best_model_flags_need_evaluations(capsys):
    err = usage_error(train_loop.main, ["--load_best_model_at_end", "true", "--eval_strategy", "no"], capsys)
    assert "compare evaluations: set --eval_strategy steps or epoch" in err
    err = usage_error(train_loop.main, ["--load_best_model_at_end", "true", "--save_strategy", "no"], capsys)
    assert "--load_best_model_at_end needs a checkpoint at every evaluation" in err
    err = usage_error(train_loop.main, ["--load_best_model_at_end", "true", "--metric_for_best_model", "acuracy"], capsys)
    assert "--metric_for_best_model 'acuracy' is not an evaluation result; use one of loss, accuracy" in err


# -----------------------------------------------------------------------------
# smaller options


def test_save_only_model_checkpoints_load_but_do_not_resume(tiny_bert, csv_data, tmp_path, capsys):
    out = tmp_path / "only"
    records(tiny_bert, csv_data, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
            "--save_only_model", "true", "--eval_strategy", "no", "--plots", "false")
    checkpoint = out / "results" / "checkpoint-2"
    from accelerate.utils import OPTIMIZER_NAME

    assert not list(checkpoint.glob(f"{OPTIMIZER_NAME}*"))  # no optimizer state, under any of accelerate's names
    assert AutoModelForSequenceClassification.from_pretrained(checkpoint).config.id2label[1] == "positive"
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, out, "--max_steps", "6",
                                                  "--resume_from_checkpoint", str(checkpoint)), capsys)
    assert "it was saved with --save_only_model, so it holds no optimizer" in err


def test_lr_scheduler_kwargs_reach_the_schedule(tiny_bert, csv_data, tmp_path, capsys):
    rows = records(tiny_bert, csv_data, tmp_path / "poly", "--max_steps", "4", "--logging_steps", "1",
                   "--learning_rate", "1e-3", "--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs",
                   '{"power": 2.0, "lr_end": 0.0}', *QUICK, "--eval_strategy", "no")
    rates = [r["learning_rate"] for r in rows if "loss" in r]
    assert rates == pytest.approx([1e-3 * (1 - used / 4) ** 2 for used in range(4)], rel=1e-3)
    assert "not valid JSON" in usage_error(train_loop.main, ["--lr_scheduler_kwargs", "{power: 2}"], capsys)


def test_label_smoothing_is_trainers(tiny_bert):
    logits, labels = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    cfg = train_loop.TrainConfig(label_smoothing_factor=0.1)
    log_p = logits.log_softmax(-1)
    by_hand = 0.9 * F.nll_loss(log_p, labels) + 0.1 * (-log_p.mean(-1)).mean()  # Trainer's LabelSmoother
    assert train_loop.smoothed_loss(logits, {"labels": labels}, cfg) == pytest.approx(by_hand.item(), abs=1e-6)


def test_activation_checkpointing_trains_the_same(tiny_bert, csv_data, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the numbers (dropout included)."""
    plain = records(tiny_bert, csv_data, tmp_path / "plain", "--max_steps", "3", "--logging_steps", "1", *QUICK,
                    "--eval_strategy", "no")
    recomputed = records(tiny_bert, csv_data, tmp_path / "ckpt", "--max_steps", "3", "--logging_steps", "1", *QUICK,
                         "--eval_strategy", "no", "--gradient_checkpointing", "true")
    assert without_timings(plain) == without_timings(recomputed)


def test_data_seed_changes_the_order_only(tiny_bert, csv_data, tmp_path):
    flags = ("--max_steps", "2", "--logging_steps", "1", *QUICK, "--eval_strategy", "no")
    default = records(tiny_bert, csv_data, tmp_path / "a", *flags)
    same = records(tiny_bert, csv_data, tmp_path / "b", *flags, "--data_seed", "42")
    other = records(tiny_bert, csv_data, tmp_path / "c", *flags, "--data_seed", "7")
    assert without_timings(default) == without_timings(same)  # --data_seed defaults to --seed
    assert default[0]["loss"] != other[0]["loss"]  # other batches first


@pytest.mark.parametrize("limit, best, kept", [
    (2, 4, [4, 8]),  # TrainingArguments: the best and the newest; N in all
    (1, 4, [4, 8]),  # "two checkpoints may be saved: the last one and the best one"
    (3, 2, [2, 6, 8]),
    (2, 8, [6, 8]),  # the newest is the best: the newest N
    (2, None, [6, 8]),
])
def test_save_total_limit_counts_the_best_checkpoint_as_trainer_does(limit, best, kept, tmp_path):
    from transformers.trainer_utils import rotate_checkpoints  # Trainer's own rule, as the oracle
    for rotate, folder in ((checkpoints.delete_old_checkpoints, tmp_path / "ours"), (rotate_checkpoints, tmp_path / "trainer")):
        for step in (2, 4, 6, 8):
            (folder / f"checkpoint-{step}").mkdir(parents=True)
        rotate(str(folder), limit, best and str(folder / f"checkpoint-{best}"))
        assert sorted(int(p.name.split("-")[1]) for p in folder.iterdir()) == kept, rotate
