"""Faults a long run meets, with real files: a diverged loss, an output path below a file, a disk
that fills during a checkpoint. Each ends in one paragraph and a non-zero exit, never a NaN model
or a damaged checkpoint."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager

import pytest
import torch
from accelerate.utils import OPTIMIZER_NAME, SCHEDULER_NAME
from safetensors.torch import load_file

import train_loop
from training import checkpoints
from training.errors import RunFailed
from conftest import assert_same_weights, free_port, read_records, reset_accelerate, train_args, without_timings
from models import ROOT

QUICK = ("--plots", "false", "--eval_strategy", "no")


def fails(argv, capsys, code):
    with pytest.raises(SystemExit) as exit_info:
        train_loop.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def test_a_diverged_run_stops_and_publishes_nothing(tiny_bert, csv_data, tmp_path, capsys):
    err = fails(train_args(tiny_bert, csv_data, tmp_path, "--learning_rate", "1e4", "--max_grad_norm", "0",
                           "--logging_steps", "1", "--num_train_epochs", "3", "--save_strategy", "no",
                           "--max_nonfinite_steps", "3", *QUICK),
                capsys, code=1)
    assert "training diverged: steps " in err and "3 in a row, had a NaN or inf loss or gradient norm" in err
    assert "Nothing was written to" in err and "--learning_rate" in err
    assert not (tmp_path / "model").exists()


def test_an_output_path_below_a_file_is_refused_before_anything_loads(tiny_bert, csv_data, tmp_path, capsys):
    (tmp_path / "some_file.txt").write_text("not a folder")
    argv = train_args(tiny_bert, csv_data, tmp_path, *QUICK)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "some_file.txt" / "results")
    err = fails(argv, capsys, code=2)
    assert f"{tmp_path / 'some_file.txt'} is a file, not a folder" in err


@contextmanager
def tmpfs(tmp_path, size):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 500 kB tmpfs: room for one tiny checkpoint (about 320 kB), not for two."""
    with tmpfs(tmp_path, "500k") as mount:
        yield mount


def test_a_full_disk_at_the_final_save_leaves_the_previous_model_whole(tiny_bert, csv_data, tmp_path, capsys):
    with tmpfs(tmp_path, "60k") as disk:  # the tiny model's weights alone are about 90 kB
        previous = disk / "model"
        previous.mkdir()
        (previous / "config.json").write_text('{"an": "earlier model"}')
        argv = train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "2", "--save_strategy", "no", *QUICK)
        argv[argv.index("--final_model_dir") + 1] = str(previous)
        err = fails(argv, capsys, code=1)
        assert f"could not save the fine-tuned model to {previous}: " in err and "Nothing half-written" in err
        assert sorted(p.name for p in disk.iterdir()) == ["model"]  # the partial folder is gone
        assert sorted(p.name for p in previous.iterdir()) == ["config.json"]
        assert (previous / "config.json").read_text() == '{"an": "earlier model"}'


def test_a_full_disk_fails_the_save_cleanly_and_the_last_checkpoint_resumes(tiny_bert, csv_data, tmp_path,
                                                                            small_disk, capsys):
    flags = ("--max_steps", "6", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", *QUICK)
    argv = train_args(tiny_bert, csv_data, tmp_path, *flags)
    argv[argv.index("--output_dir") + 1] = str(small_disk)
    err = fails(argv, capsys, code=1)
    assert "could not save checkpoint-4 into" in err and "kB were free there when the save failed" in err
    assert f"{small_disk / 'checkpoint-2'}, is intact" in err
    assert sorted(p.name for p in small_disk.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no debris
    # The checkpoint that was complete resumes exactly: to a roomier disk, against a straight run.
    shutil.copytree(small_disk / "checkpoint-2", tmp_path / "resumed" / "results" / "checkpoint-2")
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest"))
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path / "straight", *flags))
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight")
    steps = lambda out: [r for r in without_timings(read_records(out)) if r["step"] > 2]  # noqa: E731
    assert steps(tmp_path / "resumed") == steps(tmp_path / "straight")


# -----------------------------------------------------------------------------
# NaN/inf steps: skipped one by one, a run of them stops the run


class PoisonSteps:
    """A step hook: from the step after `after`, the next `count` forwards return a NaN loss, as a
    bad batch or an overflowing activation would. Registered on the real model of a real run."""

    def __init__(self, after, count=1):
        self.after, self.count, self.handle = after, count, None

    def __call__(self, run):
        if run.progress.global_step == self.after:
            self.handle = run.model.register_forward_hook(self.poison)

    def poison(self, module, args, output):
        self.count -= 1
        if self.count == 0:
            self.handle.remove()
        output.loss = output.loss * math.nan  # the backward pass then fills every gradient with NaN
        return output


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_nan_step_is_skipped_and_training_recovers(optim, tiny_bert, csv_data, tmp_path, capsys):
    flags = ("--max_steps", "6", "--logging_steps", "1", "--learning_rate", "1e-3", "--optim", optim,
             "--save_strategy", "steps", "--save_steps", "1", *QUICK)
    train_loop.run_training(train_loop.parse_config(train_args(tiny_bert, csv_data, tmp_path, *flags)),
                            step_hooks=[PoisonSteps(after=2)])
    out = capsys.readouterr().out
    assert "step 3: loss nan, grad_norm nan: not finite, the update was skipped (1 in a row; --max_nonfinite_steps 5)" in out
    checkpoints = tmp_path / "results"
    weights = {step: load_file(checkpoints / f"checkpoint-{step}" / "model.safetensors") for step in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 left every weight alone
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 trained again
    adam_steps = lambda step: torch.load(checkpoints / f"checkpoint-{step}" / f"{OPTIMIZER_NAME}.bin")["state"][0]["step"]  # noqa: E731
    assert [float(adam_steps(s)) for s in (2, 3, 4)] == [2.0, 2.0, 3.0]  # AdamW's bias correction skipped it too
    records = [r for r in read_records(tmp_path) if "loss" in r and "eval_loss" not in r and "train_loss" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(records[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 1, 1, 1]
    state = json.loads((checkpoints / "checkpoint-6" / "training_state.json").read_text())
    assert (state["nonfinite_steps"], state["nonfinite_in_row"], state["skipped_steps"]) == (1, 0, 1)
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_bert, csv_data, tmp_path, capsys):
    flags = ("--max_steps", "12", "--logging_steps", "4", "--learning_rate", "1e-3", "--max_nonfinite_steps", "3",
             "--save_strategy", "steps", "--save_steps", "2", *QUICK)
    with pytest.raises(RunFailed) as failed:
        train_loop.run_training(train_loop.parse_config(train_args(tiny_bert, csv_data, tmp_path, *flags)),
                                step_hooks=[PoisonSteps(after=2, count=100)])
    message = str(failed.value)
    # Steps 3 and 4 were read at step 4's log line; the checkpoint due at step 4 was saved (its weights
    # are step 2's); step 5's flag was read at the checkpoint of step 6, before it was written.
    assert "training diverged: steps 3 to 5, 3 in a row, had a NaN or inf loss or gradient norm (step 5: loss nan" in message
    assert f"The last checkpoint, {tmp_path / 'results' / 'checkpoint-4'}, is kept." in message
    assert sorted(p.name for p in (tmp_path / "results").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "model").exists()


# -----------------------------------------------------------------------------
# damaged checkpoints: latest falls back to the newest intact one, a named one is refused


def truncate_weights(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    return "model.safetensors holds 1,000 bytes, not the"


def lose_optimizer(checkpoint):
    (checkpoint / f"{OPTIMIZER_NAME}.bin").unlink()  # the name accelerate's save_state gives it
    return f"{OPTIMIZER_NAME}.bin is missing"


def edit_manifest(checkpoint):
    manifest = checkpoint / checkpoints.MANIFEST
    manifest.write_text(manifest.read_text().replace('"files"', '"fails"'))
    return "its checkpoint_manifest.json is not a manifest train_loop.py wrote"


def flip_a_byte(checkpoint):
    scheduler = checkpoint / f"{SCHEDULER_NAME}.bin"
    data = bytearray(scheduler.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the checksum sees it
    scheduler.write_bytes(bytes(data))
    return f"{SCHEDULER_NAME}.bin is not what was saved (its sha256 differs)"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_bert, csv_data):
    """A run of 6 steps with checkpoints at 2 and 4, and a straight run of 6: what a resume must equal."""
    out = tmp_path_factory.mktemp("two-checkpoints")
    flags = ("--max_steps", "6", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
             "--save_total_limit", "2", *QUICK)
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, out / "straight", *flags))
    reset_accelerate()
    return out / "straight", flags


@pytest.mark.parametrize("damage", [truncate_weights, lose_optimizer, edit_manifest, flip_a_byte])
def test_latest_skips_a_damaged_checkpoint_and_resumes_the_one_before(damage, two_checkpoints, tiny_bert, csv_data,
                                                                      tmp_path, capsys):
    straight, flags = two_checkpoints
    for name in ("checkpoint-4", "checkpoint-6"):  # --save_total_limit 2 kept these
        shutil.copytree(straight / "results" / name, tmp_path / "results" / name)
    said = damage(tmp_path / "results" / "checkpoint-6")
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path, *flags, "--resume_from_checkpoint", "latest"))
    out = capsys.readouterr().out
    assert f"note: --resume_from_checkpoint latest skips {tmp_path / 'results' / 'checkpoint-6'}, which is damaged: {said}" in out
    assert_same_weights(tmp_path, straight)  # resumed at step 4, trained steps 5 and 6 again: the same weights
    assert checkpoints.checkpoint_damage(str(tmp_path / "results" / "checkpoint-6")) is None  # saved afresh


@pytest.mark.parametrize("damage", [truncate_weights, flip_a_byte])
def test_a_named_damaged_checkpoint_is_refused(damage, two_checkpoints, tiny_bert, csv_data, tmp_path, capsys):
    straight, flags = two_checkpoints
    checkpoint = tmp_path / "results" / "checkpoint-6"
    shutil.copytree(straight / "results" / "checkpoint-6", checkpoint)
    said = damage(checkpoint)
    err = fails(train_args(tiny_bert, csv_data, tmp_path, *flags, "--resume_from_checkpoint", str(checkpoint)),
                capsys, code=2)
    assert f"--resume_from_checkpoint '{checkpoint}' is damaged: {said}" in err and "latest picks the newest intact" in err


def test_a_checkpoints_manifest_lists_every_file_with_its_size_and_sha256(two_checkpoints):
    straight, _ = two_checkpoints
    checkpoint = straight / "results" / "checkpoint-6"
    files = json.loads((checkpoint / checkpoints.MANIFEST).read_text())["files"]
    on_disk = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert sorted([*files, checkpoints.MANIFEST]) == on_disk
    assert {"model.safetensors", f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin", "training_state.json",
            "config.json"} <= set(files)
    for name, want in files.items():
        data = (checkpoint / name).read_bytes()
        assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_two_processes_both_stop_cleanly_when_a_save_fails(tiny_bert, csv_data, tmp_path, small_disk):
    """The main process's part of checkpoint-4 does not fit. Every process learns of the failure
    (save_checkpoint agrees on it) and exits with the message; none waits in a barrier to be killed."""
    argv = train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                      *QUICK)
    argv[argv.index("--output_dir") + 1] = str(small_disk)
    exits = tmp_path / "exits"  # tests/record_exit.py writes each process's own exit code here
    exits.mkdir()
    launcher = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "tests/record_exit.py", "train_loop.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PET_SHUTDOWN_TIMEOUT": "120",
             "PYTHONPATH": str(ROOT), "RECORD_EXIT_DIR": str(exits)})
    output = launcher.stdout + launcher.stderr
    # Ours: each process exited by itself with code 1 (a RunFailed), none left in a barrier until the
    # launcher killed it (it would have written no code). The launcher's own code is accelerate's and
    # torchrun's business: any failure will do.
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"exit-0.txt": "1", "exit-1.txt": "1"}, output[-3000:]
    assert launcher.returncode != 0, output[-3000:]
    assert output.count("error: could not save checkpoint-4 into") == 2, output[-3000:]  # each process says why
    assert sorted(p.name for p in small_disk.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
