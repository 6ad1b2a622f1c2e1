"""Study mode: the walk-through reports what the model really computes, leaves no trace behind,
and the training flags add files without changing a single logged number."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from accelerate import Accelerator

import inspect_model
import model_utils
import plots
from training import study
import train_loop
from conftest import make_reviews, reset_accelerate, train_args
from models import MINILM, ROOT

TEXTS = ["the movie was great and moving", "awful boring plot", "a film", "it was really quite bad and dull"]


# -----------------------------------------------------------------------------
# the walk-through on a tiny BERT


@pytest.fixture
def prepared(tiny_bert):
    """(accelerator, model, AdamW, batch) for the tiny BERT, as inspect_model.setup builds them."""
    accelerator = Accelerator()
    tokenizer = model_utils.load_tokenizer(tiny_bert)
    torch.manual_seed(0)
    model = model_utils.load_model(tiny_bert, ["negative", "positive"])
    cfg = train_loop.TrainConfig(learning_rate=1e-3)
    optimizer = train_loop.build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 1, 0])
    return accelerator, model, optimizer, batch


def test_walk_through_lists_every_layer_with_its_shapes(prepared):
    accelerator, model, optimizer, batch = prepared
    B, T = batch["input_ids"].shape
    rows, _ = inspect_model.walk_through(model, batch, optimizer, accelerator, max_grad_norm=1.0)
    shapes = {row.path: row.shape for row in rows}
    expected = {"bert.embeddings": (B, T, 32), "bert.pooler": (B, 32), "classifier": (B, 2), "loss": ()}
    for i in range(2):  # the tiny BERT: 2 layers, hidden 32, feed-forward 64
        layer = f"bert.encoder.layer.{i}"
        expected.update({f"{layer}.attention.self": (B, T, 32), f"{layer}.attention": (B, T, 32),
                         f"{layer}.intermediate": (B, T, 64), f"{layer}.output": (B, T, 32), layer: (B, T, 32)})
    assert {path: shapes.get(path) for path in expected} == expected
    assert [r.path for r in rows][:2] == ["bert.embeddings", "bert.encoder.layer.0.attention.self"]
    assert [r.path for r in rows][-2:] == ["classifier", "loss"]  # the order outputs are produced
    assert not any("dropout" in r.path for r in rows)
    assert all(math.isfinite(v) for r in rows for v in (r.mean, r.std, r.max_abs))
    assert all(r.dtype == "float32" for r in rows)
    by_path = {r.path: r for r in rows}
    # A layer ends in LayerNorm: mean 0, std 1 over each token's features, so over the tensor too.
    assert abs(by_path["bert.encoder.layer.1"].mean) < 1e-3 and abs(by_path["bert.encoder.layer.1"].std - 1) < 1e-3
    assert by_path["loss"].mean == pytest.approx(math.log(2), abs=0.05)  # an untrained head: a coin toss


def test_reported_grad_norms_equal_norms_computed_from_grad(prepared):
    accelerator, model, optimizer, batch = prepared
    model.train()  # from_pretrained returns eval mode; the walk-through, like training, uses train mode
    torch.manual_seed(1)  # and so the same dropout masks in both forwards
    model(**batch).loss.backward()
    direct = {name: p.grad.norm().item() for name, p in model.named_parameters()}
    layer0 = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".layer.0." in n]).norm().item()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    _, watch = inspect_model.walk_through(model, batch, optimizer, accelerator, max_grad_norm=1e-3)

    reported = {name: grad for name, _, _, grad, _, _ in watch.per_tensor()}
    assert reported.keys() == direct.keys()
    for name in direct:
        assert reported[name] == pytest.approx(direct[name], rel=1e-5, abs=1e-9), name
    # per layer = the layer's gradients as one vector; before clipping, although 1e-3 clips hard
    assert watch.per_layer()["layer.0"]["grad_norm"] == pytest.approx(layer0, rel=1e-5)
    assert set(watch.per_layer()) == {"embeddings", "layer.0", "layer.1", "pooler", "classifier"}


def test_update_ratio_is_the_real_adamw_first_step(prepared):
    """AdamW's first step per element: lr * g / (|g| + eps) plus decoupled decay lr * wd * w."""
    accelerator, model, optimizer, batch = prepared
    name = "bert.encoder.layer.1.attention.self.value.weight"  # a matrix: weight decay applies
    w = dict(model.named_parameters())[name]
    model.train()
    torch.manual_seed(2)
    model(**batch).loss.backward()
    g, w0 = w.grad.clone(), w.detach().clone()
    model.zero_grad(set_to_none=True)
    lr, wd, eps = 1e-3, 0.01, 1e-8
    expected = (lr * (g / (g.abs() + eps) + wd * w0)).norm() / w0.norm()

    torch.manual_seed(2)
    _, watch = inspect_model.walk_through(model, batch, optimizer, accelerator, max_grad_norm=0)
    ratio = next(r for n, _, _, _, _, r in watch.per_tensor() if n == name)
    assert ratio == pytest.approx(expected.item(), rel=1e-3)
    assert 1e-4 < ratio < 1e-1


def test_hooks_are_removed_and_the_model_is_left_unchanged(prepared):
    accelerator, model, optimizer, batch = prepared
    model.eval()
    with torch.inference_mode():
        before = model(**batch).logits
    rows, _ = inspect_model.walk_through(model, batch, optimizer, accelerator, max_grad_norm=1.0)
    recorded = len(rows)
    model.eval()
    with torch.inference_mode():
        after = model(**batch).logits  # a second forward: adds no rows, gives the same output
    assert len(rows) == recorded
    assert torch.equal(before, after)  # the measured step was undone
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state_dict()["state"]  # AdamW's moments reset: the next step is a first step


def test_hooks_are_removed_when_the_forward_fails(prepared):
    _, model, _, batch = prepared
    with pytest.raises(IndexError):
        with study.record_activations(model) as rows:
            model(input_ids=batch["input_ids"] + 1000)  # token ids beyond the vocabulary
    assert rows == [] and all(not m._forward_hooks for m in model.modules())


def test_layer_of_groups_parameters_by_layer():
    assert study.layer_of("bert.encoder.layer.11.attention.self.query.weight") == "layer.11"
    assert study.layer_of("bert.encoder.layer.3") == "layer.3"
    assert study.layer_of("bert.embeddings.LayerNorm.weight") == "embeddings"
    assert study.layer_of("bert.pooler.dense.bias") == "pooler"
    assert study.layer_of("classifier.weight") == "classifier"


def test_cli_shows_bf16_autocast_dtypes(tiny_bert, csv_data):
    """A separate process: accelerate's precision is fixed once per process."""
    out = subprocess.run(
        [sys.executable, "inspect_model.py", "--model_name_or_path", tiny_bert, "--dataset_name", csv_data,
         "--max_length", "32", "--per_device_train_batch_size", "4", "--mixed_precision", "bf16"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    forward = out.stdout.split("BACKWARD")[0].splitlines()
    dtype = {line.split()[0]: line.split()[-4] for line in forward if line.startswith(("bert", "classifier"))}
    assert dtype["bert.encoder.layer.0.intermediate"] == "bfloat16"  # Linear + GELU under autocast
    assert dtype["classifier"] == "bfloat16"
    assert dtype["bert.encoder.layer.0.attention"] == "float32"  # ends in LayerNorm, which autocast keeps fp32
    assert "<== largest tensor" in out.stdout and "<== largest layer" in out.stdout


def test_walk_through_builds_the_model_that_trains(tiny_bert, csv_data):
    """inspect_model.py goes through train_loop.build: --attn_implementation and the CPU speed-ups
    apply as in training (the flag used to be ignored), and the walk-through says what it runs."""
    def built(*flags):
        reset_accelerate()
        cfg, _ = inspect_model.parse_config(["--model_name_or_path", tiny_bert, "--dataset_name", csv_data,
                                             "--max_length", "32", *flags])
        accelerator, model, _, batch, what = inspect_model.setup(cfg)
        bare = accelerator.unwrap_model(model)
        dropouts = {type(m).__name__ for m in bare.modules() if isinstance(m, torch.nn.Dropout)}
        return bare.config._attn_implementation, dropouts, what

    attention, dropouts, what = built()
    assert (attention, dropouts) == ("sdpa_fast_dropout", {"FastDropout"})
    assert "attention sdpa_fast_dropout" in what and "not stock: dropout masks from numpy's PCG64" in what
    assert built("--attn_implementation", "eager")[:2] == ("eager", {"FastDropout"})
    attention, dropouts, what = built("--fast_dropout", "false", "--reuse_cpu_memory", "false")
    assert (attention, dropouts) == ("sdpa", {"Dropout"}) and what.endswith("not stock: nothing")


# -----------------------------------------------------------------------------
# training with the flags off and on


def run_training(out, model, dataset, *flags):
    args = train_args(model, dataset, out, "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
                      "--logging_steps", "2", "--save_strategy", "no", "--report_to", "tensorboard", *flags)
    train_loop.main(args)
    return Path(out) / "results"


@pytest.fixture(scope="module")
def runs(tiny_bert, csv_data, tmp_path_factory):
    """The same tiny run twice: every study flag off, and every study flag on."""
    with pytest.MonkeyPatch.context() as patch:  # flags off: no study tool may even be built
        for owner, name in ((study, "LayerWatch"), (study, "LayerLog"), (study, "StepProfiler"), (plots, "plot_run")):
            patch.setattr(owner, name, forbidden)
        off = run_training(tmp_path_factory.mktemp("off"), tiny_bert, csv_data, "--plots", "false")
    on = run_training(tmp_path_factory.mktemp("on"), tiny_bert, csv_data,
                      "--log_layer_grad_norms", "--profile_steps", "3")
    return off, on


def forbidden(*args, **kwargs):
    raise AssertionError("a study tool ran with the study flags off")


TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
          "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def logged(results):
    records = plots.read_jsonl(results / "log_history.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_flags_change_no_logged_number(runs):
    off, on = runs
    assert len(logged(off)) == 11  # 8 log lines, 2 evaluations, the summary
    assert logged(on) == logged(off)
    assert json.loads((on / "eval_results.json").read_text())["confusion_matrix"] == \
        json.loads((off / "eval_results.json").read_text())["confusion_matrix"]


def test_flags_off_write_nothing_extra(runs):
    off, _ = runs
    assert sorted(os.listdir(off)) == ["eval_results.json", "log_history.jsonl"]
    assert not (off.parent / "logs" / "profile").exists()


def test_layer_grad_norms_add_up_to_the_logged_grad_norm(runs):
    _, on = runs
    layers = plots.read_jsonl(on / "layer_stats.jsonl")
    train_lines = [r for r in logged(on) if "grad_norm" in r]
    assert [r["step"] for r in layers] == [r["step"] for r in train_lines] == list(range(2, 17, 2))
    for layer_record, line in zip(layers, train_lines):
        assert list(layer_record["grad_norm"]) == ["embeddings", "layer.0", "layer.1", "pooler", "classifier"]
        total = math.sqrt(sum(v * v for v in layer_record["grad_norm"].values()))
        assert total == pytest.approx(line["grad_norm"], rel=1e-3)  # grad_norm is logged to 4 digits
        assert all(0 < r < 0.1 for r in layer_record["update_ratio"].values())


def test_layer_grad_norms_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, on = runs
    tags = set()
    for folder, _, files in os.walk(on.parent / "logs"):  # logging_dir/<run_name>
        if any(f.startswith("events.out.tfevents") for f in files):
            tags |= set(EventAccumulator(folder).Reload().Tags()["scalars"])
    assert {"layer_grad_norm/layer.0", "layer_update_ratio/classifier", "train/loss"} <= tags


def test_profiler_writes_a_loadable_trace_and_a_summary(runs):
    _, on = runs
    traces = list((on.parent / "logs" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("name", "").startswith("ProfilerStep")) == 3
    assert any(e.get("name") == study.FORWARD_LABEL for e in events)
    summary = (on / "profile_summary.txt").read_text()
    assert summary.startswith("profiled 3 training steps after 3 warm-up steps")
    shares = {line[:17].strip(): float(line[17:23]) for line in summary.splitlines()[1:6]}
    assert list(shares) == ["data loading", "forward", "backward", "optimizer step", "other"]
    assert sum(shares.values()) == pytest.approx(100, abs=0.3)
    assert shares["forward"] > 5 and shares["backward"] > 5 and shares["optimizer step"] > 0.5
    assert "aten::" in summary  # the top-operator table


def test_pictures_are_written_and_loadable(runs):
    _, on = runs
    for name in ("training_curves.png", "confusion_matrix.png", "layer_grad_norms.png"):
        image = matplotlib.image.imread(on / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, name
        assert image.std() > 0.01, name  # not a blank canvas
    matrix = json.loads((on / "eval_results.json").read_text())["confusion_matrix"]
    assert sum(map(sum, matrix)) == 40  # every eval row counted once


def test_plots_from_records(tmp_path):
    records = [{"step": s, "loss": 0.7 - s / 100, "grad_norm": 1.0, "learning_rate": 1e-5, "epoch": s / 4}
               for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 0.5, "eval_accuracy": 0.8, "epoch": 1.0}]
    path = plots.plot_training_curves(records, tmp_path / "curves.png")
    assert matplotlib.image.imread(path).shape[0] > 200
    path = plots.plot_confusion_matrix([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png")
    assert matplotlib.image.imread(path).shape[0] > 200


# -----------------------------------------------------------------------------
# the real model


@pytest.mark.skipif(not MINILM.exists(), reason="needs ../shared/models/minilm-l6")
def test_walk_through_on_minilm(tmp_path):
    """Real weights, real IMDb-like reviews: six layers, hidden 384, FFN 1536, all finite."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    make_reviews(16, seed=5).to_csv(folder / "train.csv", index=False)
    rows, watch = inspect_model.main(["--model_name_or_path", str(MINILM),
                                      "--dataset_name", str(folder), "--max_length", "16",
                                      "--per_device_train_batch_size", "4"])
    paths = {r.path: r.shape for r in rows}
    assert [paths[f"bert.encoder.layer.{i}.intermediate"][-1] for i in range(6)] == [1536] * 6
    assert paths["bert.pooler"] == (4, 384)
    assert len(watch.per_layer()) == 9  # embeddings, 6 layers, pooler, classifier
    assert all(math.isfinite(r.std) for r in rows)
