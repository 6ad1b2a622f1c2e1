"""training/cpu_speed.py: the fast dropout draws the right masks, applies them right, changes nothing in
evaluation, and train_loop.py switches it with --fast_dropout."""

import platform
import subprocess
import sys

import pytest
import torch
from transformers import BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from training import cpu_speed
import train_loop
from conftest import read_records, reset_accelerate, train_args
from models import ROOT, tiny_bert_config


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_keep_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep = cpu_speed.keep_mask((1000, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    # 10^6 draws: the kept share has a standard deviation of at most 0.0005.
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.002)


def test_masks_follow_torchs_seed_and_advance_its_generator():
    torch.manual_seed(3)
    first, second = cpu_speed.keep_mask((64, 33), 0.1), cpu_speed.keep_mask((64, 33), 0.1)
    torch.manual_seed(3)
    assert torch.equal(cpu_speed.keep_mask((64, 33), 0.1), first)
    assert not torch.equal(first, second)


def test_dropout_scales_survivors_and_routes_gradients_through_the_same_mask():
    x = torch.randn(40, 50, requires_grad=True)
    torch.manual_seed(1)
    keep = cpu_speed.keep_mask(x.shape, 0.2)
    torch.manual_seed(1)
    y = cpu_speed.apply_dropout(x, 0.2)
    torch.testing.assert_close(y, torch.where(keep, x / 0.8, 0.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.8)
    assert cpu_speed.apply_dropout(x, 0.2, training=False) is x
    assert torch.equal(cpu_speed.apply_dropout(x, 1.0), torch.zeros_like(x))  # p = 1 drops everything


def test_masks_near_p_one_still_keep_a_few():
    torch.manual_seed(0)
    assert 0 < cpu_speed.keep_mask((1_000_000,), 0.999999).sum() < 100


def tiny_classifier(dropout=0.1):
    config = tiny_bert_config(vocab_size=100, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def padded_batch():
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # one padded row, so the attention mask matters
    return {"input_ids": ids, "attention_mask": mask}


def test_model_swap_keeps_evaluation_exact_and_train_eval_state():
    model, batch = tiny_classifier().eval(), padded_batch()
    before = model(**batch).logits
    cpu_speed.use_fast_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is cpu_speed.FastDropout and not m.training for m in dropouts)
    assert model.config._attn_implementation == cpu_speed.ATTENTION_NAME
    assert torch.equal(model(**batch).logits, before)


def test_without_dropout_training_forward_is_unchanged():
    model, batch = tiny_classifier(dropout=0.0).train(), padded_batch()
    before = model(**batch).logits
    assert torch.equal(cpu_speed.use_fast_dropout(model)(**batch).logits, before)


def test_attention_with_dropout_masks_padding_and_scales_like_sdpa(monkeypatch):
    """With every element kept, the spelled-out attention is SDPA's result divided by (1 - p)."""
    model = tiny_classifier()
    module = model.bert.encoder.layer[0].attention.self
    q, k, v = torch.randn(3, 3, 4, 10, 8).unbind(0)  # (B, heads, T, head_dim)
    mask = torch.ones(3, 1, 10, 10, dtype=torch.bool)
    mask[0, :, :, 6:] = False  # row 0: the last 4 keys are padding
    monkeypatch.setattr(cpu_speed, "keep_mask", lambda shape, p: torch.ones(shape, dtype=torch.bool))
    ours, _ = cpu_speed.attention_with_fast_dropout(module, q, k, v, mask, dropout=0.1, scaling=8**-0.5)
    sdpa, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=8**-0.5)
    torch.testing.assert_close(ours, sdpa / 0.9)


def test_training_forward_draws_from_torchs_seed():
    model, batch = cpu_speed.use_fast_dropout(tiny_classifier().train()), padded_batch()
    torch.manual_seed(5)
    first = model(**batch).logits
    torch.manual_seed(5)
    assert torch.equal(model(**batch).logits, first)
    assert not torch.equal(model(**batch).logits, first)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_setting_is_accepted_by_glibc():
    assert cpu_speed.reuse_freed_memory() is True


def test_train_loop_flag_switches_the_dropout_path(tiny_bert, csv_data, tmp_path):
    def losses(name, *flags):
        out = tmp_path / name
        reset_accelerate()
        train_loop.main(train_args(tiny_bert, csv_data, out, "--max_steps", "3", "--logging_steps", "1",
                                   "--eval_strategy", "no", "--save_strategy", "no", "--plots", "false", *flags))
        return [r["loss"] for r in read_records(out) if "loss" in r]

    fast, fast_again = losses("fast"), losses("fast_again")
    stock, stock_again = losses("stock", "--fast_dropout", "false"), losses("again", "--fast_dropout", "false")
    assert len(fast) == len(stock) == 3
    assert fast == fast_again and stock == stock_again  # each path is deterministic under the seed ...
    assert fast[0] != stock[0]  # ... and the flag really changes which masks are drawn


def banner_lines(capsys, tiny_bert, csv_data, out, *flags):
    """The run banner's model and "not stock" lines, from a one-step run."""
    reset_accelerate()
    train_loop.main(train_args(tiny_bert, csv_data, out, "--max_steps", "1", "--eval_strategy", "no",
                               "--save_strategy", "no", "--plots", "false", *flags))
    banner = capsys.readouterr().out.split("***** training *****")[1]
    return [line.strip() for line in banner.splitlines() if line.startswith(("  model", "  not stock"))]


def test_banner_names_each_cpu_speed_up_with_the_flag_that_turns_it_off(tiny_bert, csv_data, tmp_path, capsys):
    model, dropout, memory = banner_lines(capsys, tiny_bert, csv_data, tmp_path / "default")
    assert model.endswith("attention sdpa_fast_dropout, not compiled")  # what attention layers call
    assert dropout == ("not stock: dropout masks from numpy's PCG64 in dropout layers and attention "
                       "(cpu_speed.py; off: --fast_dropout false)")
    assert memory.startswith("not stock: glibc keeps freed memory") and memory.endswith("off: --reuse_cpu_memory false)")
    eager = banner_lines(capsys, tiny_bert, csv_data, tmp_path / "eager", "--attn_implementation", "eager")
    assert eager[0].endswith("attention eager, not compiled") and "in dropout layers (cpu_speed.py" in eager[1]
    stock = banner_lines(capsys, tiny_bert, csv_data, tmp_path / "stock", "--fast_dropout", "false",
                         "--reuse_cpu_memory", "false")
    assert stock[0].endswith("attention sdpa, not compiled") and stock[1:] == ["not stock: nothing"]


def test_importing_switches_nothing_on():
    """Attention functions are registered with transformers when a speed-up is switched on, not at import."""
    code = ("import training.cpu_speed, train_loop, inspect_model, serve.app, serve.packed; "
            "from transformers import AttentionInterface, AttentionMaskInterface; "
            "print(sorted({'sdpa_fast_dropout', 'packed_sdpa'} & "
            "(set(AttentionInterface()) | set(AttentionMaskInterface()))), 'sdpa' in AttentionInterface())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"  # none of ours; transformers' own are listed (the check sees names)
    model = cpu_speed.use_fast_dropout(tiny_classifier())
    assert model.config._attn_implementation == cpu_speed.ATTENTION_NAME  # switched on: registered and routed
