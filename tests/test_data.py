"""Loading, validation and tokenization: every bad dataset gets its own clear error."""

import time

import pandas as pd
import pytest
from transformers import AutoTokenizer

import data
import train_loop
from conftest import make_reviews, train_args, usage_error
from training.errors import UsageError, require_local_or_reachable
from models import IMDB


def write_csvs(folder, train, test=None):
    folder.mkdir(exist_ok=True)
    pd.DataFrame(train).to_csv(folder / "train.csv", index=False)
    if test is not None:
        pd.DataFrame(test).to_csv(folder / "test.csv", index=False)
    return str(folder)


def load_and_validate(dataset_name, train_split="train", eval_split="test", text="text", label="label"):
    splits = data.load_splits(dataset_name, train_split, eval_split)
    return splits, data.validate(splits, text, label)


GOOD = {"text": ["good film", "bad film", "great", "awful"], "label": ["pos", "neg", "pos", "neg"]}


def test_label_names_from_strings_ints_and_classlabel(tmp_path, csv_data):
    _, names = load_and_validate(csv_data)
    assert names == ["negative", "positive"]  # sorted distinct strings
    folder = write_csvs(tmp_path / "ints", {"text": ["a", "b", "c"], "label": [5, 3, 5]},
                        {"text": ["d"], "label": [3]})
    splits, names = load_and_validate(folder)
    assert names == ["3", "5"]
    assert [data.label_to_id(splits["train"].features["label"], names)(v) for v in (3, 5)] == [0, 1]


def test_imdb_classlabel_names():
    splits = data.load_splits(str(IMDB), "train[:2%]+train[-2%:]", "test[:1%]")
    assert data.validate(splits, "text", "label") == ["neg", "pos"]


@pytest.mark.parametrize("train, test, kwargs, message", [
    ({"review": ["a", "b"], "label": [0, 1]}, None, {}, "the train split has no column 'text' (it has ['review', 'label'])"),
    ({"text": ["a", "b"], "stars": [0, 1]}, None, {}, "Name the right one with --label_column"),
    ({"text": ["a", "   ", "c"], "label": [0, 1, 0]}, None, {}, "row 1 of the train split has '   ' in text column"),
    ({"text": ["a", None, "c"], "label": [0, 1, 0]}, None, {}, "row 1 of the train split has None"),
    ({"text": ["a", "b", "c"], "label": [1, 1, 1]}, None, {}, "the train split has only one class"),
    ({"text": ["a", "b", "c"], "label": [0.5, 1.0, 0.0]}, None, {}, "labels must be integers or strings"),
    (GOOD, {"text": ["x", "y"], "label": ["pos", "meh"]}, {}, "row 1 of the eval split has label 'meh'"),
    (GOOD, None, {"eval_split": "validation"}, "split 'validation' is not in the dataset"),
])
def test_bad_datasets_are_named_precisely(tmp_path, train, test, kwargs, message):
    test = test if test is not None else train
    folder = write_csvs(tmp_path / "d", train, test)
    with pytest.raises(UsageError) as err:
        load_and_validate(folder, **kwargs)
    assert message in str(err.value)


def test_files_whose_columns_differ(tmp_path):
    folder = write_csvs(tmp_path / "d", GOOD, {"review": ["x"], "label": ["pos"]})
    with pytest.raises(UsageError) as err:
        data.load_splits(folder, "train", "test")
    # Ours: the folder named, datasets' root cause in brackets (its last line, whatever its words), the fix.
    message = str(err.value)
    start, end = f"--dataset_name {folder!r} could not be read (", (
        "). Check that every data file is well-formed and has the same columns, with the same types.")
    assert message.startswith(start) and message.endswith(end), message
    reason = message[len(start):-len(end)]
    assert reason.strip() and "\n" not in reason, message
    assert "An error occurred while generating the dataset" not in reason, message  # the cause, not the wrapper


def test_empty_split_and_missing_files(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n")
    with pytest.raises(UsageError, match="has no rows"):
        data.load_splits(f"train={folder / 'train.csv'}", "train", None)
    with pytest.raises(UsageError, match="does not exist"):
        data.load_splits(str(tmp_path / "nope.csv"), "train", None)
    with pytest.raises(UsageError, match="name every file"):
        data.load_splits(f"train={folder / 'train.csv'},{folder / 'train.csv'}", "train", None)


def test_single_file_with_sliced_splits(tmp_path):
    path = tmp_path / "reviews.json"
    make_reviews(20, seed=5).to_json(path, orient="records", lines=True)
    splits = data.load_splits(str(path), "train[:75%]", "train[75%:]")
    assert (len(splits["train"]), len(splits["eval"])) == (15, 5)


def test_bad_data_through_the_cli_exits_2(tiny_bert, tmp_path, capsys):
    folder = write_csvs(tmp_path / "d", {"text": ["a", "b"], "label": [0, 1]}, {"text": ["c"], "label": [0]})
    err = usage_error(train_loop.main, train_args(tiny_bert, folder, tmp_path, "--text_column", "review"), capsys)
    assert err.splitlines()[-1].startswith("error: the train split has no column 'review'")


def test_subset_is_random_not_the_first_rows():
    """IMDb is sorted negatives first: a seeded shuffle keeps both classes in a small subset."""
    splits = data.load_splits(str(IMDB), "train", None)
    subset = data.take_subset(splits["train"], 100, seed=42)
    labels = subset["label"]
    assert len(labels) == 100 and 30 < sum(labels) < 70
    assert data.take_subset(splits["train"], 100, seed=42)["text"][:3] == subset["text"][:3]


def test_tokenize_truncates_without_padding_and_is_cached(tiny_bert, csv_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    splits = data.load_splits(csv_data, "train", "test")
    names = data.validate(splits, "text", "label")
    first = data.tokenize(splits["train"], tokenizer, "text", "label", names, max_length=9)
    lengths = [len(ids) for ids in first["input_ids"]]
    assert max(lengths) == 9 and min(lengths) == 7  # truncated at 9, short rows keep their own length
    assert first.column_names == ["input_ids", "token_type_ids", "attention_mask", "labels"]
    assert sorted(set(first["labels"])) == [0, 1]
    cache = first.cache_files[0]["filename"]
    second = data.tokenize(splits["train"], tokenizer, "text", "label", names, max_length=9)
    assert second.cache_files[0]["filename"] == cache  # read back, not computed again
    third = data.tokenize(splits["train"], tokenizer, "text", "label", names, max_length=10)
    assert third.cache_files[0]["filename"] != cache  # other settings, other cache


def test_unreachable_hub_fails_within_seconds():
    start = time.perf_counter()
    with pytest.raises(UsageError) as err:
        # port 9 on loopback refuses at once: the same answer a machine without network gets
        require_local_or_reachable("bert-base-uncased", "--model_name_or_path", "model",
                                   endpoint="http://127.0.0.1:9")
    assert time.perf_counter() - start < 5
    assert "Pass a local copy instead, e.g. --model_name_or_path ../shared/models/minilm-l6" in str(err.value)


def test_default_hub_names_fail_fast_offline(capsys, monkeypatch):
    """The seed's defaults (bert-base-uncased, imdb) on this offline machine: a message in seconds."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    err = usage_error(train_loop.main, ["--report_to", "none"], capsys)
    assert time.perf_counter() - start < 10
    assert "--dataset_name 'imdb' is not a local path" in err
