"""Faults a long run meets, with real files: a diverged loss, an output path below a file, a disk
that fills during a checkpoint. Each ends in one paragraph and a non-zero exit, never a NaN model
or a damaged checkpoint."""

import os
import shutil
import subprocess
import uuid

import pytest

import train_loop
from conftest import assert_same_weights, read_records, reset_accelerate, train_args, without_timings

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
                           "--logging_steps", "1", "--num_train_epochs", "3", "--save_strategy", "no", *QUICK),
                capsys, code=1)
    assert "training diverged: the loss or gradient norm logged at step" in err and "not finite" in err
    assert "Nothing was written to" in err and "--learning_rate" in err
    assert not (tmp_path / "model").exists()


def test_an_output_path_below_a_file_is_refused_before_anything_loads(tiny_bert, csv_data, tmp_path, capsys):
    (tmp_path / "some_file.txt").write_text("not a folder")
    argv = train_args(tiny_bert, csv_data, tmp_path, *QUICK)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "some_file.txt" / "results")
    err = fails(argv, capsys, code=2)
    assert f"{tmp_path / 'some_file.txt'} is a file, not a folder" in err


@pytest.fixture
def small_disk(tmp_path):
    """A 500 kB tmpfs: room for one tiny checkpoint (about 320 kB), not for two."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


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
