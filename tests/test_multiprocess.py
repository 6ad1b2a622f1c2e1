"""Two CPU processes through the real `accelerate launch` (gloo), compared with one process.

`accelerate launch --cpu --num_processes 2` silently starts one process; `--multi_gpu` with
ACCELERATE_USE_CPU=1 starts two that talk over gloo, which is what we want here.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import train_loop
from conftest import assert_same_weights, free_port, read_records, train_args, without_timings
from models import ROOT


def launch_two(script, *args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), script, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_share_each_epoch_without_overlap(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "rows"
    launch_two(str(ROOT / "tests" / "two_process_batches.py"), str(out),
               *train_args(tiny_bert, csv_data, tmp_path))
    per_process = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    # 64 rows, batch 8 per process: 4 batches each per epoch, 32 rows each
    assert [len(rows) for rows in per_process] == [64, 64]

    from transformers import AutoTokenizer
    import datasets
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = datasets.load_dataset(csv_data, split="train")["text"]
    every_row = Counter(tuple(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts)
    for epoch in (0, 1):
        seen = Counter(tuple(ids) for rows in per_process for e, ids in rows if e == epoch)
        assert seen == every_row  # each row exactly once per epoch, across the two processes
    first_epoch_order = [ids for e, ids in per_process[0] if e == 0]
    assert first_epoch_order != [ids for e, ids in per_process[0] if e == 1]  # reshuffled each epoch


def test_two_process_training_follows_the_formulas_and_evaluates_every_row_once(tiny_bert, csv_data, tmp_path):
    flags = ("--num_train_epochs", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--warmup_steps", "2",
             "--save_strategy", "no")
    launch_two(str(ROOT / "train_loop.py"), *train_args(tiny_bert, csv_data, tmp_path / "two", *flags))
    records = read_records(tmp_path / "two")
    logs = [r for r in records if "loss" in r]
    # global batch 16 -> 64 / 16 = 4 steps per epoch, 8 in all: half of one process's 16
    assert [r["step"] for r in logs] == list(range(1, 9))
    for r in logs:
        used = r["step"] - 1
        expected = 1e-3 * used / 2 if used < 2 else 1e-3 * (8 - used) / 6
        assert r["learning_rate"] == pytest.approx(expected, rel=1e-3)
        assert r["epoch"] == round(r["step"] / 4, 2)
        assert math.isfinite(r["loss"])
    assert logs[-1]["learning_rate"] > 0  # the schedule did not run out early (stepped once per step)

    with open(tmp_path / "two" / "results" / "eval_results.json") as f:
        two = json.load(f)
    # 40 eval rows are 3 batches of 16 across two processes: padded to 48, gathered back to 40
    assert two["eval_samples"] == 40 and sum(map(sum, two["confusion_matrix"])) == 40

    # The same saved model evaluated by one process gives the same metrics.
    one = train_loop.main(train_args(str(tmp_path / "two" / "model"), csv_data, tmp_path / "one",
                                     "--do_train", "False"))
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert one["eval_accuracy"] == two["eval_accuracy"] and one["eval_f1"] == two["eval_f1"]
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], abs=1e-6)


def test_two_process_checkpoints_are_model_folders_and_resume_exactly(tiny_bert, csv_data, tmp_path):
    """Under DDP the checkpoint holds the model's own weight names and config (from_pretrained reads
    it), and two processes resume from it to the same logs and weights."""
    flags = ("--max_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-3", "--save_strategy", "steps",
             "--save_steps", "2", "--eval_strategy", "no", "--plots", "false")
    launch_two(str(ROOT / "train_loop.py"), *train_args(tiny_bert, csv_data, tmp_path / "straight", *flags))
    checkpoint = tmp_path / "straight" / "results" / "checkpoint-2"
    names = set(load_file(checkpoint / "model.safetensors"))
    assert not any(name.startswith("module.") for name in names) and "classifier.weight" in names
    assert AutoModelForSequenceClassification.from_pretrained(checkpoint).config.id2label[1] == "positive"

    shutil.copytree(tmp_path / "straight" / "results", tmp_path / "resumed" / "results")
    resumed_from = tmp_path / "resumed" / "results" / "checkpoint-2"
    launch_two(str(ROOT / "train_loop.py"), *train_args(tiny_bert, csv_data, tmp_path / "resumed", *flags,
                                                        "--resume_from_checkpoint", str(resumed_from)))
    assert without_timings(read_records(tmp_path / "resumed")) == without_timings(read_records(tmp_path / "straight"))
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_per_layer_norms_under_fsdp2_equal_the_unsharded_models(tiny_bert, tmp_path):
    """--log_layer_grad_norms and inspect_model.py with sharded parameters: every process takes part,
    and each layer's norm (and the total) is the whole parameter's, not one shard's."""
    out = tmp_path / "norms"
    launch_two(str(ROOT / "tests" / "two_process_fsdp_norms.py"), str(out), tiny_bert)
    for rank in (0, 1):
        result = json.loads(Path(f"{out}.{rank}").read_text())
        plain, fsdp = result["plain"], result["fsdp"]
        assert fsdp["sharded"] == "DTensor" and plain["sharded"] == "Parameter"
        assert fsdp["shapes"] == plain["shapes"]  # the whole parameters' shapes, not the shards'
        assert fsdp["per_layer"].keys() == plain["per_layer"].keys() and len(plain["per_layer"]) == 5
        for layer, stats in plain["per_layer"].items():
            assert fsdp["per_layer"][layer]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-5), layer
        assert fsdp["total"] == pytest.approx(plain["total"], rel=1e-5) and plain["total"] > 0
