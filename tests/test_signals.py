"""Preemption and Ctrl-C, with real processes and real signals: a stop request finishes the step,
saves a checkpoint at that step boundary, exits with 128 + the signal's number, and the run resumed
from that checkpoint ends exactly as one never interrupted (weights bit for bit, the same logs)."""

import os
import signal
import subprocess
import sys
import time

import pytest

import train_loop
from training import checkpoints, faults
from conftest import assert_same_weights, free_port, read_records, reset_accelerate, train_args, without_timings
from models import ROOT

LONG = ("--num_train_epochs", "12", "--logging_steps", "1", "--save_strategy", "no", "--plots", "false")  # 96 steps


def start(command, out, **env):
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(ROOT), **env})


def wait_for_steps(process, out, steps, timeout=120):
    """Until the run has logged `steps` training steps (it is then mid-training)."""
    deadline = time.monotonic() + timeout
    path = out / "results" / "log_history.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps} (exit {process.poll()}): {process.stdout.read()[-2000:]}")


def stopped_step(output, signal_name):
    lines = [line[line.index("stopped at step"):] for line in output.replace("\r", "\n").splitlines()
             if "stopped at step" in line]
    assert len(lines) == 1, output[-3000:]  # said once, by the main process
    line = lines[0]
    assert line.endswith(f"on {signal_name}; resume with --resume_from_checkpoint latest"), line
    return int(line.split()[3])


def stop_with(sig, tiny_bert, csv_data, out):
    """Start a run, signal it mid-training, return the step it stopped at (checked: exit code, checkpoint)."""
    process = start([sys.executable, "train_loop.py", *train_args(tiny_bert, csv_data, out, *LONG)], out)
    wait_for_steps(process, out, 5)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + sig.value, output[-2000:]  # 143, 130, 138
    step = stopped_step(output, sig.name)
    assert 5 <= step < 96 and (out / "results" / f"checkpoint-{step}").is_dir()
    assert not (out / "model").exists()  # nothing is published from a stopped run
    return step


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_slurms_warning_signal_stop_the_same_way(sig, tiny_bert, csv_data, tmp_path):
    stop_with(sig, tiny_bert, csv_data, tmp_path / "stopped")


def test_sigterm_checkpoints_the_step_and_the_resume_is_exact(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "stopped"
    stop_with(signal.SIGTERM, tiny_bert, csv_data, out)
    # Resumed and straight runs in processes like the first (the same thread count: the same float sums)
    for run_out, extra in ((out, ("--resume_from_checkpoint", "latest")), (tmp_path / "straight", ())):
        done = start([sys.executable, "train_loop.py", *train_args(tiny_bert, csv_data, run_out, *LONG, *extra)], run_out)
        assert done.wait(timeout=300) == 0, done.stdout.read()[-2000:]
    assert_same_weights(out, tmp_path / "straight")
    assert without_timings(read_records(out)) == without_timings(read_records(tmp_path / "straight"))


def launch(tiny_bert, csv_data, out, *extra):
    """Two CPU processes through `accelerate launch`: the launcher torchrun's agent runs in. Each
    runs train_loop.py through tests/record_exit.py, which writes down the code it exits with."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "tests/record_exit.py", "train_loop.py",
            *train_args(tiny_bert, csv_data, out, *LONG, *extra)]


def stop_launcher(sig, tiny_bert, csv_data, out, **env):
    """Signal the launcher mid-run; return the step both processes stopped at (one checkpoint, both parts)."""
    exits = out / "exits"
    exits.mkdir(parents=True)
    launcher = start(launch(tiny_bert, csv_data, out), out, RECORD_EXIT_DIR=str(exits), **env)
    wait_for_steps(launcher, out, 4)
    launcher.send_signal(sig)
    output, _ = launcher.communicate(timeout=120)
    # Ours: every process exits with 128 + N. The launcher's own code is accelerate's and torchrun's
    # business (1 in accelerate 1.10-1.15, 143 in 1.16): any failure will do.
    assert {p.name: p.read_text() for p in exits.iterdir()} == {
        "exit-0.txt": str(128 + sig.value), "exit-1.txt": str(128 + sig.value)}, output[-2000:]
    assert launcher.returncode != 0, output[-2000:]
    step = stopped_step(output, sig.name)  # printed once, by the main process
    # One checkpoint, at that step, with both processes' state: they stopped at the same step.
    checkpoints = [p.name for p in (out / "results").iterdir() if p.name.startswith("checkpoint-")]
    assert checkpoints == [f"checkpoint-{step}"], checkpoints
    checkpoint = out / "results" / f"checkpoint-{step}"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                             "random_states_1.pkl"]
    return step


def test_two_processes_stop_at_the_same_step(tiny_bert, csv_data, tmp_path):
    """The signal goes to `accelerate launch`, which passes it on; the processes agree on the step."""
    out = tmp_path / "stopped"
    stop_launcher(signal.SIGTERM, tiny_bert, csv_data, out)
    launch_ = lambda out, *extra: launch(tiny_bert, csv_data, out, *extra)  # noqa: E731
    resumed = start(launch_(out, "--resume_from_checkpoint", "latest"), out, RECORD_EXIT_DIR=str(tmp_path))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-2000:]
    straight = start(launch_(tmp_path / "straight"), tmp_path / "straight", RECORD_EXIT_DIR=str(tmp_path))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-2000:]
    assert_same_weights(out, tmp_path / "straight")
    assert without_timings(read_records(out)) == without_timings(read_records(tmp_path / "straight"))


def test_the_launcher_passes_sigusr1_on_when_told_to(tiny_bert, csv_data, tmp_path):
    """SLURM's warning signal: torchrun's agent (inside `accelerate launch`) passes on SIGTERM, SIGINT,
    SIGHUP and SIGQUIT only, and dies of an unhandled SIGUSR1, leaving its workers to train on
    unwarned. PET_SIGNALS_TO_HANDLE (torchrun's --signals-to-handle) adds it (docs/faults.md)."""
    stop_launcher(signal.SIGUSR1, tiny_bert, csv_data, tmp_path / "stopped",
                  PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


def test_a_second_ctrl_c_stops_at_once():
    request = faults.StopRequest(type("Single", (), {"num_processes": 1})())
    request.handle(signal.SIGINT, None)
    assert request.agreed() == "SIGINT"  # the first: stop at the next step boundary
    with pytest.raises(KeyboardInterrupt):
        request.handle(signal.SIGINT, None)


@pytest.mark.parametrize("sig, moment", [(signal.SIGTERM, "evaluation"), (signal.SIGINT, "save")])
def test_a_signal_during_evaluation_or_right_after_a_save_stops_there_and_resumes_exactly(
        sig, moment, tiny_bert, csv_data, tmp_path, monkeypatch, capsys):
    """A real signal to this process, sent from inside the loop's evaluation or just after a
    checkpoint save: the stop waits for the step boundary, saves no second checkpoint, and resumes."""
    flags = ("--num_train_epochs", "3", "--logging_steps", "1", "--plots", "false", "--eval_strategy", "epoch",
             "--save_strategy", "steps", "--save_steps", "3")  # an epoch is 8 steps: evaluations at 8, 16, 24
    out = tmp_path / "stopped"
    module, name = {"evaluation": (train_loop, "evaluate"), "save": (checkpoints, "save_checkpoint")}[moment]
    real = getattr(module, name)
    sent = []

    def signalled(*args, **kwargs):
        if moment == "evaluation" and not sent:
            os.kill(os.getpid(), sig)  # mid-evaluation: the handler runs now, the stop waits
            sent.append(True)
        result = real(*args, **kwargs)
        if moment == "save" and not sent:
            os.kill(os.getpid(), sig)
            sent.append(True)
        return result

    monkeypatch.setattr(module, name, signalled)
    with pytest.raises(SystemExit) as stopped:
        train_loop.main(train_args(tiny_bert, csv_data, out, *flags))
    assert stopped.value.code == 128 + sig.value
    step = stopped_step(capsys.readouterr().out, sig.name)
    assert step == {"evaluation": 8, "save": 3}[moment]
    assert sorted(p.name for p in (out / "results").iterdir() if p.name.startswith("checkpoint")) == (
        ["checkpoint-3", "checkpoint-6", "checkpoint-8"] if moment == "evaluation" else ["checkpoint-3"])
    monkeypatch.undo()
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, out, *flags, "--resume_from_checkpoint", "latest"))
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path / "straight", *flags))
    assert_same_weights(out, tmp_path / "straight")
    assert without_timings(read_records(out)) == without_timings(read_records(tmp_path / "straight"))
