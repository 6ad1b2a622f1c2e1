"""Data side of the pipeline: load a labelled text dataset, check it, tokenize it, batch it.

    raw = load_splits(cfg.dataset_name, cfg.train_split, cfg.eval_split)
    label_names = validate(raw, cfg.text_column, cfg.label_column)
    tokenized = tokenize(raw, tokenizer, ...)      # input_ids, attention_mask, labels; no padding
    train_dl, eval_dl = build_dataloaders(...)     # padding happens here, per batch

`dataset_name` is a Hub id (`imdb`), a local dataset folder (`../shared/data/imdb`), or local
csv/json/parquet files: one file (`reviews.csv`, its rows form the `train` split) or several as
`train=train.csv,test=test.csv`. Any split may carry a slice, as in `--eval_split "train[:10%]"`.
"""

import math
import os

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from errors import UsageError, require_local_or_reachable

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# -----------------------------------------------------------------------------
# loading


def load_splits(dataset_name, train_split, eval_split):
    """{"train": Dataset, "eval": Dataset} read by name, folder or files; eval_split=None skips eval."""
    builder, data_files = parse_dataset_name(dataset_name)
    wanted = {"train": train_split, "eval": eval_split}
    return {role: load_split(builder, data_files, split) for role, split in wanted.items() if split}


def parse_dataset_name(dataset_name):
    """(path for load_dataset, data_files or None)."""
    parts = [p.strip() for p in dataset_name.split(",") if p.strip()]
    named = dict(p.split("=", 1) for p in parts if "=" in p)
    paths = list(named.values()) if named else parts
    if not any(os.path.splitext(p)[1].lower() in FILE_BUILDERS for p in paths):
        require_local_or_reachable(dataset_name, "--dataset_name", "dataset")
        return dataset_name, None
    if named and len(named) != len(parts):
        raise UsageError(f"--dataset_name {dataset_name!r}: name every file (train=a.csv,test=b.csv) or none.")
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--dataset_name: data file {path!r} does not exist.")
    extensions = {os.path.splitext(p)[1].lower() for p in paths}
    if len(extensions) != 1 or extensions - FILE_BUILDERS.keys():
        raise UsageError(
            f"--dataset_name {dataset_name!r}: files must all be .csv, all .json/.jsonl or all .parquet."
        )
    return FILE_BUILDERS[extensions.pop()], named or {"train": paths}


def load_split(path, data_files, split):
    try:
        ds = datasets.load_dataset(path, data_files=data_files, split=split)
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' words for an empty file
            raise UsageError(f"split {split!r} of {path!r} has no rows.") from None
        if "split" not in str(err).lower():  # Unknown split "x". Should be one of ['train', 'test'].
            raise
        raise UsageError(
            f"split {split!r} is not in the dataset ({err}). Choose one with --train_split / "
            '--eval_split, or carve one out of another split, e.g. --train_split "train[:90%]" '
            '--eval_split "train[90%:]".'
        ) from None
    except FileNotFoundError as err:
        raise UsageError(f"--dataset_name {path!r}: {err}. Pass a Hub dataset id, a folder or data files.") from None
    except datasets.exceptions.DatasetGenerationError as err:  # e.g. files whose columns differ
        raise UsageError(
            f"--dataset_name {path!r} could not be read ({generation_error_reason(err)}). Check that every "
            "data file is well-formed and has the same columns, with the same types."
        ) from None
    if len(ds) == 0:
        raise UsageError(f"split {split!r} of {path!r} has no rows.")
    return ds


def generation_error_reason(err):
    """The root cause's last line: datasets wraps it in "An error occurred while generating the dataset"."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# validation: fail before tokenizing, with the column, row and split named


def validate(splits, text_column, label_column):
    """Check every split and return the label names, index i = class id i (from the train split)."""
    for role, ds in splits.items():
        check_columns(ds, role, text_column, label_column)
        check_texts(ds, role, text_column)
    names = label_names_of(splits["train"], label_column)
    for role, ds in splits.items():
        check_labels(ds, role, label_column, names)
    if len(set(splits["train"][label_column])) < 2:
        raise UsageError(
            f"the train split has only one class in column {label_column!r} ({names[0]!r}); a classifier "
            "needs at least two. If you took a subset, note that some datasets (IMDb) are sorted by label."
        )
    return names


def check_columns(ds, role, text_column, label_column):
    for flag, column in (("--text_column", text_column), ("--label_column", label_column)):
        if column not in ds.column_names:
            raise UsageError(
                f"the {role} split has no column {column!r} (it has {ds.column_names}). "
                f"Name the right one with {flag}."
            )


def check_texts(ds, role, text_column):
    for row, text in enumerate(ds[text_column]):
        if not isinstance(text, str) or not text.strip():
            raise UsageError(
                f"row {row} of the {role} split has {text!r} in text column {text_column!r}; every row "
                "needs a non-empty string. Drop or fix such rows before training."
            )


def label_names_of(ds, label_column):
    """ClassLabel names when the dataset declares them, else the sorted distinct values."""
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = [v for v in set(ds[label_column]) if v is not None]
    if values and all(isinstance(v, str) for v in values):
        return sorted(values)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    raise UsageError(
        f"label column {label_column!r} holds {feature}; labels must be integers or strings "
        "(class names such as 'positive'/'negative')."
    )


def check_labels(ds, role, label_column, names):
    feature = ds.features[label_column]
    allowed = range(len(names)) if isinstance(feature, datasets.ClassLabel) else set(names)
    for row, label in enumerate(ds[label_column]):
        key = label if isinstance(feature, datasets.ClassLabel) or isinstance(label, str) else str(label)
        if label is None or isinstance(label, bool) or key not in allowed:
            raise UsageError(
                f"row {row} of the {role} split has label {label!r} in column {label_column!r}, which is "
                f"not one of the training labels {names}. Fix the row or drop it."
            )


def label_to_id(feature, names):
    """Function mapping a raw label value to its class id 0..K-1."""
    if isinstance(feature, datasets.ClassLabel):
        return int
    index = {name: i for i, name in enumerate(names)}
    return lambda label: index[label if isinstance(label, str) else str(label)]


# -----------------------------------------------------------------------------
# subsetting and tokenization


def take_subset(ds, max_samples, seed):
    """A seeded random subset: IMDb is sorted by label, so the first N rows would all be negative."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(max_samples))


def tokenize(ds, tokenizer, text_column, label_column, label_names, max_length):
    """input_ids, attention_mask (and token_type_ids) truncated to max_length, plus `labels`.

    No padding here: each row keeps its real length and the collator pads per batch, so a batch
    of short reviews costs short-review compute. `datasets` caches the result on disk, keyed by
    the data, the tokenizer and these arguments, so the next run skips this step.
    """
    to_id = label_to_id(ds.features[label_column], label_names)

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = [to_id(label) for label in batch[label_column]]
        return encoded

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


# -----------------------------------------------------------------------------
# batching


def build_collator(tokenizer, mixed_precision):
    """Pads each batch to its longest row; multiples of 8 let fp16/bf16 tensor cores work on whole tiles."""
    multiple = 8 if mixed_precision in ("fp16", "bf16") else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


def build_dataloaders(train_ds, eval_ds, collator, train_batch_size, eval_batch_size, seed, num_workers=0):
    """Shuffled training batches (the order depends only on `seed` and the epoch) and ordered eval batches.

    The generators keep DataLoader from drawing on the global torch RNG, which also drives dropout:
    a resumed run then sees exactly the dropout masks of an uninterrupted one.
    """
    train_dl = DataLoader(
        train_ds,
        shuffle=True,
        batch_size=train_batch_size,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    eval_dl = None
    if eval_ds is not None:
        eval_dl = DataLoader(
            eval_ds,
            batch_size=eval_batch_size,
            collate_fn=collator,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
    return train_dl, eval_dl


def steps_per_epoch(num_batches, gradient_accumulation_steps):
    """Optimizer steps in one pass over `num_batches` micro-batches (the last partial window steps too)."""
    return math.ceil(num_batches / gradient_accumulation_steps)
