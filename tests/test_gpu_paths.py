"""What a mixed-precision GPU job runs, proved on a CPU where the bug can be reproduced there:
torch.compile'd models saved under their own names, fp16 overflow steps detected with the fused
AdamW too, resuming across precisions, TF32 refused where it does not exist, pinned memory and
non-blocking copies that survive the resume rebuild, and the GPU check's own model and data.

fp16 on a CPU: accelerate refuses to set up fp16 autocast and a grad scaler on a CPU, but torch
supports both there, so `fp16_on_cpu` sets them up as accelerate does on a GPU (autocast to
float16, a torch.amp.GradScaler) before prepare(): the same accelerate and torch code then runs.
"""

import argparse
import math
import types

import pytest
import torch
from accelerate.utils import SCALER_NAME, DistributedType
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

import model_utils
import train_loop
from training import checkpoints, engines, faults
from bench import gpu_check
from conftest import read_records, reset_accelerate, train_args, usage_error

QUICK = ("--eval_strategy", "no", "--save_strategy", "no", "--plots", "false")
# What is refused or set up by hand on a CPU would be real on a GPU: these tests are for CPU machines.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="reproduces on a CPU what a GPU does natively")
TEXTS = ["the movie was great and moving", "awful boring plot", "a film", "it was really quite bad and dull"]


def fp16_on_cpu(accelerator, init_scale=2.0**8):
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)


def start(args, fp16=False):
    """parse_config -> build -> start_run, as run_training does, with fp16 set up on the CPU if asked."""
    cfg = train_loop.parse_config(args)
    setup = train_loop.build(cfg)
    if fp16:
        fp16_on_cpu(setup.accelerator)
    return train_loop.start_run(cfg, setup)


# -----------------------------------------------------------------------------
# torch.compile: one decision, and the saved model is the plain one


def saved_keys_and_predictions(out, run):
    """(the saved weights' names, the uncompiled model's names, pipeline() against the trained model)."""
    saved = set(load_file(f"{out}/model/model.safetensors"))
    expected = set(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(f"{out}/model")).state_dict())
    served = pipeline("text-classification", model=f"{out}/model", top_k=None)(TEXTS)
    served = torch.tensor([[next(s["score"] for s in row if s["label"] == label) for label in ("negative", "positive")]
                           for row in served])
    bare = run.accelerator.unwrap_model(run.model, keep_torch_compile=False).eval()  # no dropout, as pipeline()
    trained = model_utils.classify(bare, run.tokenizer, TEXTS)
    return saved, expected, served, trained


@pytest.mark.parametrize("how", ["flag", "accelerate config"])
def test_compiled_model_is_saved_under_its_own_names(how, tiny_bert, csv_data, tmp_path, monkeypatch, capsys):
    if how == "flag":
        flags = ["--torch_compile_backend", "eager"]  # eager: dynamo's graph capture, no inductor build
    else:
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")  # what `accelerate launch` sets from the config
        flags = []
    run, _ = train_loop.run_training(train_loop.parse_config(
        train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "4", "--learning_rate", "1e-3", *QUICK, *flags)))
    banner = capsys.readouterr().out
    assert f"torch.compile backend eager (from {'--torch_compile' if how == 'flag' else 'accelerate config'})" in banner
    assert "dropout masks" not in banner  # the numpy dropout would split dynamo's graph: off
    assert type(run.model).__name__ == "OptimizedModule"  # really compiled
    saved, expected, served, trained = saved_keys_and_predictions(tmp_path, run)
    assert saved == expected and not any(k.startswith("_orig_mod.") for k in saved)
    assert torch.allclose(served, trained, atol=1e-5)  # pipeline() loads the trained weights, not fresh ones


def test_torch_compile_false_overrides_accelerate_config(tiny_bert, csv_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    run, _ = train_loop.run_training(train_loop.parse_config(
        train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "1", *QUICK, "--torch_compile", "false")))
    assert ", not compiled" in capsys.readouterr().out
    assert type(run.model).__name__ != "OptimizedModule"


# -----------------------------------------------------------------------------
# fp16: an overflow step is skipped, reported, and does not advance the schedule


@cpu_only
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_fp16_overflow_step_is_skipped_and_the_schedule_waits(optim, tiny_bert, csv_data, tmp_path):
    run = start(train_args(tiny_bert, csv_data, tmp_path, "--mixed_precision", "fp16", "--optim", optim,
                           "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-3", *QUICK), fp16=True)
    bias = run.accelerator.unwrap_model(run.model).classifier.bias
    before_backward = {}

    def infinite_gradient_at_step_2(grad):
        step = run.progress.global_step + 1  # the optimizer step this backward belongs to
        before_backward[step] = bias.detach().clone()
        return grad * math.inf if step == 2 else grad

    bias.register_hook(infinite_gradient_at_step_2)
    scale = run.accelerator.scaler.get_scale()
    summary = train_loop.train(run)
    steps = [r for r in read_records(tmp_path) if "loss" in r]
    # linear decay over 4 steps from 1e-3; the skipped step 2 does not advance it, so step 3 reuses its rate
    assert [r["learning_rate"] for r in steps] == [1e-3, 7.5e-4, 7.5e-4, 5e-4]
    assert [r["skipped_steps"] for r in steps] == [0, 1, 1, 1] and summary["skipped_steps"] == 1
    assert torch.equal(before_backward[3], before_backward[2])  # step 2 left the weights as they were
    assert not torch.equal(before_backward[2], before_backward[1])  # step 1 did move them
    assert run.accelerator.scaler.get_scale() == scale / 2  # the scaler backed off once, and only once
    assert all(math.isfinite(r["loss"]) for r in steps[2:])  # training went on
    assert run.lr_scheduler.scheduler.last_epoch == 3


# -----------------------------------------------------------------------------
# resuming in another precision: allowed, the loss scaler starts fresh or is left unused


@cpu_only
def test_resume_in_fp16_from_a_bf16_checkpoint_and_back(tiny_bert, csv_data, tmp_path, capsys):
    flags = ("--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
             "--plots", "false")
    bf16 = tmp_path / "bf16"
    run = start(train_args(tiny_bert, csv_data, bf16, "--mixed_precision", "bf16", "--max_steps", "2", *flags[2:]))
    train_loop.train(run)
    assert not (bf16 / "results" / "checkpoint-2" / SCALER_NAME).exists()

    reset_accelerate()
    run = start(train_args(tiny_bert, csv_data, bf16, "--mixed_precision", "fp16", *flags,
                           "--resume_from_checkpoint", "latest"), fp16=True)
    assert f"was saved without fp16 (no {SCALER_NAME}); this fp16 run starts a fresh loss scaler at scale 256" in capsys.readouterr().out
    assert run.progress.global_step == 2
    train_loop.train(run)
    assert run.progress.global_step == 4 and (bf16 / "results" / "checkpoint-4" / SCALER_NAME).exists()

    reset_accelerate()
    final = train_loop.main(train_args(tiny_bert, csv_data, bf16, "--mixed_precision", "bf16", "--max_steps", "6",
                                       *flags[2:], "--resume_from_checkpoint", "latest"))
    out = capsys.readouterr().out
    assert f"checkpoint-4 was saved under fp16; this run (bf16) needs no loss scaler, so its {SCALER_NAME} is not used" in out
    assert "resuming at step 4" in out and final is not None
    assert [r["step"] for r in read_records(bf16) if "train_runtime" in r][-1] == 6


# -----------------------------------------------------------------------------
# TF32, pinned memory, non-blocking copies


@cpu_only
def test_tf32_and_fp16_are_refused_where_there_are_none(tiny_bert, csv_data, tmp_path, capsys):
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, tmp_path, "--tf32", "true"), capsys)
    assert "--tf32 true needs an NVIDIA GPU of the Ampere generation or newer; this run is on cpu" in err
    assert not (tmp_path / "results").exists()  # refused before anything was loaded or written
    reset_accelerate()
    # accelerate accepts fp16 on a CPU and then runs fp32 (no autocast, no scaler) while saying fp16
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, tmp_path, "--mixed_precision", "fp16"), capsys)
    assert "--mixed_precision fp16 needs a GPU (this run is on cpu); on a CPU use --mixed_precision bf16 or no." in err
    assert not (tmp_path / "results").exists()


def test_cuda_loaders_pin_memory_and_the_resume_rebuild_keeps_non_blocking(tiny_bert, csv_data, tmp_path):
    cfg = train_loop.parse_config(train_args(tiny_bert, csv_data, tmp_path))
    off = train_loop.parse_config(train_args(tiny_bert, csv_data, tmp_path, "--dataloader_pin_memory", "false"))
    assert engines.pins_memory(cfg, torch.device("cuda")) and not engines.pins_memory(cfg, torch.device("cpu"))
    assert not engines.pins_memory(off, torch.device("cuda"))
    setup = train_loop.build(cfg)
    # The loader a CUDA run builds (pinning itself needs a GPU, the settings do not), prepared as training does.
    train_dl, _ = train_loop.data.build_dataloaders(setup.train_ds, None, setup.train_dl.collate_fn, 8, 8, cfg.seed,
                                                    pin_memory=True)
    prepared = setup.accelerator.prepare(train_dl)
    assert prepared.pin_memory and prepared._non_blocking
    run = types.SimpleNamespace(train_dl=prepared, cfg=cfg, accelerator=setup.accelerator, steps_per_epoch=len(prepared),
                                progress=checkpoints.Progress(global_step=0))
    assert checkpoints.epoch_batches(run, 0) is prepared  # nothing to skip: the prepared loader itself
    run.progress.global_step = 3  # resumed mid-epoch: the first three batches are skipped by a rebuilt loader
    rebuilt = checkpoints.epoch_batches(run, 0)
    assert rebuilt is not prepared and len(list(rebuilt)) == len(prepared) - 3
    assert rebuilt.pin_memory and rebuilt._non_blocking


# -----------------------------------------------------------------------------
# the GPU check's own model and data


def test_gpu_check_tokenizer_has_every_word_and_the_smoke_run_learns(tmp_path):
    gpu_check.make(str(tmp_path), smoke=True)
    tokenizer = model_utils.load_tokenizer(str(tmp_path / "bert-base"))
    assert len(tokenizer) == 5 + gpu_check.WORDS
    assert tokenizer.unk_token_id not in tokenizer("w1 w2 w29999")["input_ids"]  # words are words, not [UNK]
    args = argparse.Namespace(out=str(tmp_path), precision="fp32", steps=150, batch=16, full_epoch=False,
                              learning_rate=1e-3, workers=0)
    report = gpu_check.run(args)
    assert report["eval accuracy"] >= 0.9  # the one deciding word is learned: chance is 0.5
    assert report["first/last loss"][0] > 0.6 > 0.2 > report["first/last loss"][1]
    assert report["steps"] == 150 and report["skipped steps"] == 0 and gpu_check.checks(report) == []


def test_a_device_without_fused_adamw_gets_the_plain_one_said_and_skipped_on_the_host(tiny_bert, csv_data, tmp_path,
                                                                                         monkeypatch):
    """An Apple GPU with an older torch has no fused AdamW: the plain one runs, the banner says so, and
    a NaN step is skipped by not stepping ("host"), since the plain AdamW ignores the found_inf flag."""
    cfg = train_loop.parse_config(train_args(tiny_bert, csv_data, tmp_path, *QUICK))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert engines.has_fused_adamw("cpu") and engines.has_fused_adamw("mps")  # this torch has both
    monkeypatch.setattr("torch.utils._foreach_utils._get_fused_kernels_supported_devices", lambda: ["cuda"])
    plain = train_loop.build_optimizer(model, cfg, "cpu")
    assert not plain.defaults["fused"]
    assert engines.optimizer_line(plain, cfg) == "AdamW, torch's per-tensor loop: this torch has no fused AdamW for this device"
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), scaler=None, distributed_type=DistributedType.NO)
    assert faults.nonfinite_skip(cfg, accelerator) == "host"
    monkeypatch.undo()
    assert train_loop.build_optimizer(model, cfg, "cpu").defaults["fused"]
    assert faults.nonfinite_skip(cfg, accelerator) == "device"
