"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` with the shipped configs, on this CPU.

DeepSpeed runs on a CPU as one process (accelerate sets up several DeepSpeed processes only on
GPUs), which is enough to check what the loop does differently under its engine: the engine
clips and steps inside backward, takes its micro-batch, accumulation and clipping from our flags,
and writes its own checkpoint format. One process under ZeRO-2 or ZeRO-3 computes what one plain
process computes, so the logs and weights must match a plain run's. The GPU check runs the rest.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import read_records, train_args, without_timings
from models import ROOT

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

CONFIGS = ROOT / "configs"
QUICK = ("--max_steps", "6", "--logging_steps", "1", "--per_device_train_batch_size", "8",
         "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no", "--plots", "false")


def launch(config, out, tiny_bert, csv_data, *extra, check=True, launch_flags=(), exits=None):
    """`accelerate launch --config_file configs/<config>` as one fp32 process on this CPU. With `exits`
    (a folder), through tests/record_exit.py, which writes the process's own exit code there."""
    recorded = {"RECORD_EXIT_DIR": str(exits)} if exits else {}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
         "--num_processes", "1", "--mixed_precision", "no", *launch_flags,
         *(["tests/record_exit.py"] if exits else []), "train_loop.py",
         *train_args(tiny_bert, csv_data, out, *QUICK, *extra)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **recorded})
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def plain(out, tiny_bert, csv_data, *extra):
    subprocess.run([sys.executable, "train_loop.py", *train_args(tiny_bert, csv_data, out, *QUICK, *extra)],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def weights(folder):
    return load_file(f"{folder}/model.safetensors")


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol


@pytest.fixture(scope="module")
def plain_run(tiny_bert, csv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    plain(out, tiny_bert, csv_data)
    return out


@pytest.mark.parametrize("config,stage", [("deepspeed_zero2_bf16.yaml", 2), ("deepspeed_zero3_bf16.yaml", 3)])
def test_zero_trains_as_one_plain_process(config, stage, plain_run, tiny_bert, csv_data, tmp_path):
    done = launch(config, tmp_path, tiny_bert, csv_data)
    assert f"engine DeepSpeed ZeRO-{stage}:" in done.stdout + done.stderr
    assert "gradient_clipping 1 = --max_grad_norm" in done.stdout + done.stderr
    # The same losses, gradient norms (the engine's) and learning rates, step by step.
    assert without_timings(read_records(tmp_path)) == without_timings(read_records(plain_run))
    atol = 0.0 if stage == 2 else 1e-7  # ZeRO-3 gathers its shards: float round-off in the last bit
    assert_close_weights(weights(tmp_path / "model"), weights(plain_run / "model"), atol)
    checkpoint = tmp_path / "results" / "checkpoint-6"
    assert (checkpoint / "latest").is_file() and (checkpoint / "pytorch_model").is_dir()  # the engine's own format
    # ... and a model folder as well: full weights under their own names (no LayerNorm.gamma).
    assert_close_weights(weights(checkpoint), weights(plain_run / "model"), atol)
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).state_dict()
    served = weights(tmp_path / "model")
    assert all(torch.equal(reloaded[k], served[k]) for k in served)


def test_zero3_resumes_as_if_never_stopped(plain_run, tiny_bert, csv_data, tmp_path):
    first = tmp_path / "first"
    launch("deepspeed_zero3_bf16.yaml", first, tiny_bert, csv_data)
    resumed = tmp_path / "resumed"
    (resumed / "results").mkdir(parents=True)
    os.rename(first / "results" / "checkpoint-3", resumed / "results" / "checkpoint-3")
    launch("deepspeed_zero3_bf16.yaml", resumed, tiny_bert, csv_data, "--resume_from_checkpoint", "latest")
    after = [r for r in without_timings(read_records(first)) if r["step"] > 3]
    assert [r for r in without_timings(read_records(resumed)) if r["step"] > 3] == after  # the schedule too
    assert_close_weights(weights(resumed / "model"), weights(first / "model"), 0.0)


def test_the_engine_clips_at_max_grad_norm(plain_run, tiny_bert, csv_data, tmp_path):
    """--max_grad_norm 0.05, below every step's norm: DeepSpeed's clipping (filled from the flag) must
    change the weights exactly as the plain loop's clip_grad_norm_ does."""
    clipped_plain = tmp_path / "plain"
    plain(clipped_plain, tiny_bert, csv_data, "--max_grad_norm", "0.05")
    assert min(r["grad_norm"] for r in read_records(clipped_plain) if "grad_norm" in r) > 0.05
    deepspeed = tmp_path / "deepspeed"
    done = launch("deepspeed_zero2_bf16.yaml", deepspeed, tiny_bert, csv_data, "--max_grad_norm", "0.05")
    assert "gradient_clipping 0.05 = --max_grad_norm" in done.stdout + done.stderr
    # DeepSpeed scales by max_norm / (norm + 1e-6) in its own kernels: equal up to float round-off.
    for ours, theirs in zip(without_timings(read_records(deepspeed)), without_timings(read_records(clipped_plain)), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)
    assert_close_weights(weights(deepspeed / "model"), weights(clipped_plain / "model"), 1e-6)
    unclipped = weights(plain_run / "model")
    assert any(not torch.equal(unclipped[k], weights(deepspeed / "model")[k]) for k in unclipped)


def test_gradient_accumulation_and_an_epochs_short_last_window(tiny_bert, csv_data, tmp_path):
    """64 rows in batches of 4, three per step, one epoch: five steps of three micro-batches, then one
    of one. accelerate's sync_gradients and the engine's boundary agree, and the short window's
    gradient is its mean (DeepSpeed would divide it by 3), as in the plain loop."""
    flags = ("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3",
             "--max_steps", "-1", "--num_train_epochs", "1", "--save_strategy", "no")
    plain(tmp_path / "plain", tiny_bert, csv_data, *flags)
    launch("deepspeed_zero2_bf16.yaml", tmp_path / "deepspeed", tiny_bert, csv_data, *flags)
    records = without_timings(read_records(tmp_path / "deepspeed"))
    assert [r["step"] for r in records if "grad_norm" in r] == [1, 2, 3, 4, 5, 6]
    assert records == without_timings(read_records(tmp_path / "plain"))  # step 6's grad_norm: the mean's
    # loss / 1 against loss x rows x (steps / rows): the same gradient up to the last bit
    assert_close_weights(weights(tmp_path / "deepspeed" / "model"), weights(tmp_path / "plain" / "model"), 1e-8)


def exit_codes(exits):
    """What tests/record_exit.py wrote: {"exit-<rank>.txt": the code that process exited with}."""
    return {p.name: p.read_text() for p in exits.iterdir()}


def test_a_disagreeing_config_is_refused(tiny_bert, csv_data, tmp_path):
    (exits := tmp_path / "exits").mkdir()
    done = launch("deepspeed_zero2_bf16.yaml", tmp_path, tiny_bert, csv_data, "--max_grad_norm", "0.5", check=False,
                  launch_flags=("--gradient_clipping", "1.0"), exits=exits)
    assert done.returncode != 0  # the launcher's own code is accelerate's and torchrun's business
    output = done.stdout + done.stderr
    assert "the DeepSpeed config sets gradient_clipping: 1.0, but --max_grad_norm is 0.5" in output
    assert exit_codes(exits) == {"exit-0.txt": "2"}, output[-3000:]  # the training process refused it as bad input
    assert "train_loop.py\", line" not in output  # no traceback from the loop (the launcher prints its own)
    assert not (tmp_path / "results" / "checkpoint-3").exists()


def test_best_model_at_end_is_refused_under_zero3(tiny_bert, csv_data, tmp_path):
    (exits := tmp_path / "exits").mkdir()
    done = launch("deepspeed_zero3_bf16.yaml", tmp_path, tiny_bert, csv_data, "--load_best_model_at_end", "true",
                  "--eval_strategy", "steps", "--eval_steps", "3", "--metric_for_best_model", "accuracy", check=False,
                  exits=exits)
    assert "--load_best_model_at_end loads the best checkpoint's weights into the model, which ZeRO-3" in done.stdout + done.stderr
    assert exit_codes(exits) == {"exit-0.txt": "2"}, done.stderr[-3000:]
    assert done.returncode != 0


def test_per_layer_norms_are_refused_under_deepspeed(tiny_bert, csv_data, tmp_path):
    (exits := tmp_path / "exits").mkdir()
    done = launch("deepspeed_zero2_bf16.yaml", tmp_path, tiny_bert, csv_data, "--log_layer_grad_norms", "true", check=False,
                  exits=exits)
    assert "--log_layer_grad_norms reads each layer's gradients before the optimizer step" in done.stdout + done.stderr
    assert exit_codes(exits) == {"exit-0.txt": "2"}, done.stderr[-3000:]
    assert done.returncode != 0


def test_a_deepspeed_config_that_would_silently_become_ddp_is_refused(tiny_bert, csv_data, tmp_path):
    """Two CPU processes: accelerate sets up MULTI_CPU for a DeepSpeed config; the loop says so and stops."""
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "deepspeed_zero2_bf16.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(29700 + os.getpid() % 200),
         "train_loop.py", *train_args(tiny_bert, csv_data, tmp_path, *QUICK)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "the accelerate config asks for DEEPSPEED, but accelerate set up MULTI_CPU" in done.stdout + done.stderr


def test_a_deepspeed_checkpoint_is_not_resumed_by_another_engine(tiny_bert, csv_data, tmp_path, capsys):
    """The engine writes its own format: resuming it without DeepSpeed is refused, naming both."""
    import train_loop
    from conftest import usage_error

    launch("deepspeed_zero2_bf16.yaml", tmp_path, tiny_bert, csv_data)
    checkpoint = tmp_path / "results" / "checkpoint-3"
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, tmp_path, *QUICK, "--resume_from_checkpoint",
                                                 str(checkpoint)), capsys)
    assert f"cannot resume from '{checkpoint}': it was saved by DEEPSPEED ZeRO-2 and this run is NO" in err
