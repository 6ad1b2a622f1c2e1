"""Length-grouped training batches and length-sorted evaluation, checked by value.

The sampler must cover every row exactly once per epoch, on one process or several, in an order
that is a pure function of (seed, epoch) so that a resumed run repeats an uninterrupted one;
evaluation may run in any order but must report in dataset order.
"""

import subprocess
import sys

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from torch.utils.data import DataLoader

import data
import model_utils
import train_loop
from conftest import (assert_same_weights, crash_then_resume, read_records, reset_accelerate, train_args,
                      usage_error, without_timings)
from models import ROOT



def review_lengths(n, seed=0):
    """IMDb-like token counts: a long right tail, capped at 512."""
    g = torch.Generator().manual_seed(seed)
    return (torch.empty(n).log_normal_(5.4, 0.6, generator=g).clamp(8, 512)).long()


def epoch_batches(lengths, batch_size, num_processes=1, seed=42, epoch=0):
    sampler = data.LengthGroupedBatchSampler(lengths, batch_size, num_processes, seed)
    sampler.set_epoch(epoch)
    return list(sampler), len(sampler)


def padding_share(lengths, batches):
    """Padded tokens / all tokens once each batch is padded to its longest row."""
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - int(lengths.sum()) / padded


def shard(batches, num_processes, index):
    """What accelerate gives process `index` of a list of batches (BatchSamplerShard, as prepare() builds)."""
    return list(BatchSamplerShard(batches, num_processes=num_processes, process_index=index))


# -----------------------------------------------------------------------------
# the sampler


@pytest.mark.parametrize("n, batch_size, num_processes", [(100, 8, 1), (96, 8, 1), (103, 8, 3), (3, 8, 1), (37, 1, 2)])
def test_every_row_once_per_epoch_in_full_batches(n, batch_size, num_processes):
    lengths = review_lengths(n)
    for epoch in range(3):
        batches, length = epoch_batches(lengths, batch_size, num_processes, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert length == len(batches) and len(batches) % num_processes == 0
        full, tail = n // (batch_size * num_processes), n % (batch_size * num_processes)
        assert all(len(b) == batch_size for b in batches[: (full - 1) * num_processes])
        assert all(1 <= len(b) <= max(batch_size, 2) for b in batches)  # batch 1: a tail batch may hold 2
        if tail == 0:
            assert len(batches) == full * num_processes


def test_grouping_removes_most_padding():
    lengths = review_lengths(2000)
    grouped, _ = epoch_batches(lengths, 8)
    shuffled = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).split(8)
    assert padding_share(lengths, shuffled) > 0.35  # random batches: over a third is padding
    assert padding_share(lengths, grouped) < 0.03


def test_order_is_a_pure_function_of_seed_and_epoch():
    lengths = review_lengths(500)
    first, _ = epoch_batches(lengths, 8, seed=42, epoch=1)
    assert epoch_batches(lengths, 8, seed=42, epoch=1)[0] == first  # a fresh sampler, same order
    assert epoch_batches(lengths, 8, seed=42, epoch=2)[0] != first  # a new order each epoch
    assert epoch_batches(lengths, 8, seed=7, epoch=1)[0] != first
    sampler = data.LengthGroupedBatchSampler(lengths, 8, seed=42)
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler) == first  # iterating does not advance anything


def test_steps_are_shuffled_and_the_longest_comes_first():
    lengths = review_lengths(800)
    batches, _ = epoch_batches(lengths, 8)
    longest = [int(lengths[b].max()) for b in batches]
    assert longest[0] == int(lengths.max())  # out-of-memory, if any, surfaces at step 1
    # 2 mega-batches of 400 rows: sorted but unshuffled, lengths would fall in 2 long runs.
    falls = sum(a < b for a, b in zip(longest, longest[1:]))
    assert falls > 25


@pytest.mark.parametrize("n", [64, 61, 50, 33, 17])
def test_two_processes_share_each_epoch_without_repeats(n):
    lengths = review_lengths(n)
    batches, _ = epoch_batches(lengths, 8, num_processes=2)
    ranks = [shard(batches, 2, i) for i in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])  # both processes step together, to the end
    rows = [i for rank in ranks for b in rank for i in b]
    assert sorted(rows) == list(range(n))  # together: each row once, none repeated to even up
    # The batches run side by side in a step come from one sorted run: similar lengths.
    for b0, b1 in zip(*ranks):
        assert int(lengths[b1].max()) <= int(lengths[b0].min())


def test_prepared_loaders_reach_the_sampler_and_split_it():
    """Through accelerate's own prepare_data_loader: set_epoch must reach our sampler on 1 and 2 processes."""
    lengths = review_lengths(45)
    loader = lambda: DataLoader(range(45), batch_sampler=data.LengthGroupedBatchSampler(lengths, 4, 2, seed=3),
                                collate_fn=list)
    expected, _ = epoch_batches(lengths, 4, num_processes=2, seed=3, epoch=5)
    got = []
    for index in (0, 1):
        dl = prepare_data_loader(loader(), num_processes=2, process_index=index, put_on_device=False,
                                 use_seedable_sampler=True)
        dl.set_epoch(5)
        got.append(list(dl))
    assert got == [expected[0::2], expected[1::2]]
    single = prepare_data_loader(DataLoader(range(45), batch_sampler=data.LengthGroupedBatchSampler(lengths, 4, seed=3),
                                            collate_fn=list), put_on_device=False, use_seedable_sampler=True)
    single.set_epoch(5)
    assert list(single) == epoch_batches(lengths, 4, seed=3, epoch=5)[0]
    assert len(single) == len(list(single))


def test_token_lengths_follow_a_selection():
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * k for k in (5, 3, 9, 1, 4)]})
    picked = ds.shuffle(seed=0).select([0, 2, 3])
    assert data.token_lengths(picked).tolist() == [len(ids) for ids in picked["input_ids"]]


# -----------------------------------------------------------------------------
# training: the grouped sampler resumed mid-epoch


def test_resume_mid_epoch_with_grouped_batches(tiny_bert, csv_data, tmp_path, monkeypatch):
    # 64 rows in batches of 6: 10 full + 1 tail batch, 11 steps per epoch. Checkpoint at step 14
    # (epoch 1, 3 batches in), crash at 16: the resume must set epoch 1 and skip exactly 3 batches.
    flags = ("--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--logging_steps", "2",
             "--save_strategy", "steps", "--save_steps", "7", "--learning_rate", "1e-3", "--group_by_length", "true")
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path / "straight", *flags))
    straight = read_records(tmp_path / "straight")

    resumed = tmp_path / "resumed"
    crash_then_resume(tiny_bert, csv_data, resumed, flags, crash_at_step=16, monkeypatch=monkeypatch)
    assert [r["step"] for r in straight if "loss" in r] == list(range(2, 23, 2))
    assert without_timings(read_records(resumed)) == without_timings(straight)
    assert_same_weights(resumed, tmp_path / "straight")


def test_grouping_is_part_of_the_resume_contract(tiny_bert, csv_data, tmp_path, capsys):
    train_loop.main(train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "3", "--save_strategy", "steps",
                               "--save_steps", "3"))
    reset_accelerate()
    err = usage_error(train_loop.main, train_args(tiny_bert, csv_data, tmp_path, "--max_steps", "6",
                                                  "--no_group_by_length", "--resume_from_checkpoint", "latest"), capsys)
    assert "group_by_length: True -> False" in err


# -----------------------------------------------------------------------------
# evaluation: sorted by length, reported in dataset order


def tokenized_eval_split(tiny_bert, csv_data):
    tokenizer = model_utils.load_tokenizer(tiny_bert)
    splits = data.load_splits(csv_data, "train", "test")
    names = data.validate(splits, "text", "label")
    ds = data.tokenize(splits["eval"], tokenizer, "text", "label", names, max_length=32)
    return ds, tokenizer, names


def test_sorted_evaluation_reports_in_dataset_order(tiny_bert, csv_data):
    ds, tokenizer, names = tokenized_eval_split(tiny_bert, csv_data)
    torch.manual_seed(0)
    model = model_utils.load_model(tiny_bert, names).eval()

    def one_by_one():  # row by row, no padding at all: the reference logits (N, 2)
        with torch.inference_mode():
            return torch.cat([model(**{k: torch.tensor([ds[i][k]]) for k in ("input_ids", "attention_mask")}).logits
                              for i in range(len(ds))])

    with torch.no_grad():  # a random head whose boundary lies in the widest gap between middle rows' margins:
        model.classifier.weight.normal_(0, 100.0)  # it answers both classes, and padding's rounding flips none
        margins = one_by_one().diff(dim=-1).squeeze(-1).sort().values[10:30]
        widest = margins.diff().argmax()
        model.classifier.bias[1] -= (margins[widest] + margins[widest + 1]) / 2
    expected = one_by_one().argmax(dim=-1).tolist()
    assert 5 <= sum(expected) <= 35  # both classes, so a misplaced prediction shows
    collator = data.build_collator(tokenizer, "no")
    _, sorted_dl = data.build_dataloaders(ds, ds, collator, 8, 8, seed=0)
    in_order_dl = DataLoader(data.with_row_numbers(ds), batch_size=8, collate_fn=collator)
    first_rows = next(iter(sorted_dl))["row"].tolist()
    assert first_rows != list(range(8))  # the sorted loader really reorders
    lengths = data.token_lengths(ds)
    assert lengths[first_rows].min() >= lengths.max() - 1  # longest first

    accelerator = Accelerator(cpu=True)
    sorted_results, sorted_confusion, sorted_predictions = train_loop.evaluate(model, sorted_dl, accelerator, 2)
    plain_results, plain_confusion, plain_predictions = train_loop.evaluate(model, in_order_dl, accelerator, 2)

    assert sorted_predictions.tolist() == plain_predictions.tolist() == expected
    assert sorted_confusion == plain_confusion and sum(map(sum, sorted_confusion)) == len(ds) == 40
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall"):
        assert sorted_results[key] == pytest.approx(plain_results[key], abs=1e-6)


def evaluate_on_each_process(tiny_bert, csv_data, out):
    """Run in each of 2 processes: the sorted, sharded evaluation; the main process saves what it got."""
    ds, tokenizer, names = tokenized_eval_split(tiny_bert, csv_data)
    torch.manual_seed(0)
    model = model_utils.load_model(tiny_bert, names).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 100.0)
    accelerator = Accelerator(cpu=True)
    # 40 rows in batches of 6: 7 batches, so accelerate repeats rows to give both processes 4.
    _, eval_dl = data.build_dataloaders(ds, ds, data.build_collator(tokenizer, "no"), 6, 6, seed=0)
    results, confusion, predictions = train_loop.evaluate(model, accelerator.prepare(eval_dl), accelerator, 2)
    if accelerator.is_main_process:
        torch.save({"processes": accelerator.num_processes, "predictions": predictions, "results": results}, out)


def test_two_process_evaluation_reports_each_row_once_in_dataset_order(tiny_bert, csv_data, tmp_path):
    # debug_launcher forks: from a fresh interpreter, since forking this one after torch has started
    # its OpenMP threads can deadlock the children.
    launch = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; from accelerate import debug_launcher; "
              f"from test_speed import evaluate_on_each_process as f; "
              f"debug_launcher(f, args=({tiny_bert!r}, {csv_data!r}, {str(tmp_path / 'two.pt')!r}), num_processes=2)")
    done = subprocess.run([sys.executable, "-c", launch], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate_on_each_process(tiny_bert, csv_data, tmp_path / "one.pt")
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert (two["processes"], one["processes"]) == (2, 1)
    assert len(two["predictions"]) == 40
    assert two["predictions"].tolist() == one["predictions"].tolist()
    assert two["results"]["eval_loss"] == pytest.approx(one["results"]["eval_loss"], abs=1e-5)
