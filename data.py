"""Data side of the pipeline: load a labelled text dataset, check it, tokenize it, batch it.

    raw = load_splits(cfg.dataset_name, cfg.train_split, cfg.eval_split)
    label_names = validate(raw, cfg.text_column, cfg.label_column)
    tokenized = tokenize(raw, tokenizer, ...)      # input_ids, attention_mask, labels; no padding
    train_dl, eval_dl = build_dataloaders(...)     # length-grouped batches, padded per batch

`dataset_name` is a Hub id (`imdb`), a local dataset folder (`../shared/data/imdb`), or local
csv/json/parquet files: one file (`reviews.csv`, its rows form the `train` split) or several as
`train=train.csv,test=test.csv`. Any split may carry a slice, as in `--eval_split "train[:10%]"`.
"""

import math
import os
import signal

import datasets
import pyarrow.compute as pc
from accelerate import PartialState
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding

from training.errors import UsageError, require_local_or_reachable

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# -----------------------------------------------------------------------------
# a training run's data, from its flags (train_loop.build calls these two)


def load_for_training(cfg):
    """Raw splits, validated and subset, with the label names: all before any model is downloaded."""
    splits = load_splits(cfg.dataset_name, cfg.train_split, cfg.eval_split)
    label_names = validate(splits, cfg.text_column, cfg.label_column)
    limits = {"train": cfg.max_train_samples, "eval": cfg.max_eval_samples}
    splits = {role: take_subset(ds, limits[role], cfg.seed) for role, ds in splits.items()}
    if len(set(splits["train"][cfg.label_column])) < 2:
        raise UsageError(f"the {len(splits['train'])}-row training subset has one class only; take more rows.")
    return splits, label_names


def tokenize_splits(cfg, splits, label_names, tokenizer, accelerator):
    """(train, eval or None), tokenized once by the main process, then read from the cache by all."""
    with accelerator.main_process_first():
        tokenized = {
            role: tokenize(ds, tokenizer, cfg.text_column, cfg.label_column, label_names, cfg.max_length)
            for role, ds in splits.items()
        }
    return tokenized["train"], tokenized.get("eval")


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
# batching: rows of similar length together, so padding (pure waste) stays small


def token_lengths(ds):
    """Tokens per row as a (N,) tensor, read from the Arrow list offsets: no Python lists of ids."""
    column = ds.with_format("arrow")["input_ids"]  # respects a select()/shuffle() index mapping
    return torch.from_numpy(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype("int64"))


def with_row_numbers(ds):
    """Add a `row` column (0..N-1) so batches say which rows they hold, whatever order they come in."""
    return ds.add_column("row", list(range(len(ds))))


def step_plan(num_rows, batch_size, num_processes):
    """(full steps, rows left for the tail, tail batches) of one epoch; see `length_grouped_batches`.

    A step takes `num_processes` batches, one per process. The rows that do not fill a last full
    step are spread evenly over `num_processes * k` smaller batches, so every process gets the same
    number of batches without any row repeated or dropped. Fewer tail rows than processes cannot be
    spread that way: they join the last full step instead.
    """
    step_rows = batch_size * num_processes
    full_steps, tail_rows = divmod(num_rows, step_rows)
    if 0 < tail_rows < num_processes and full_steps:
        full_steps, tail_rows = full_steps - 1, tail_rows + step_rows
    # As many batches as needed to keep each <= batch_size, but never an empty one (batch_size 1).
    tail_steps = min(math.ceil(tail_rows / step_rows), tail_rows // num_processes)
    return full_steps, tail_rows, tail_steps * num_processes


def length_grouped_batches(lengths, batch_size, num_processes, generator, mega_batch_mult=50):
    """One epoch of batches (lists of row ids) where each batch holds rows of similar length.

    Trainer's LengthGroupedSampler idea: shuffle all rows, cut them into mega-batches of
    `mega_batch_mult` steps, sort each mega-batch by length, cut it into steps of
    `num_processes` batches (so the batches the processes run side by side have similar lengths
    too), then shuffle the steps, so the loss does not see long-to-short sawtooth runs.
    The step holding the longest row goes first: if memory runs out, it does so at once.
    Unlike Trainer (which shrinks mega-batches so that there are at least 4), a mega-batch is
    always `mega_batch_mult` steps: less padding, but a dataset smaller than one mega-batch gets
    the same batches every epoch, in a new order.
    """
    num_rows, step_rows = len(lengths), batch_size * num_processes
    full_steps, tail_rows, tail_batches = step_plan(num_rows, batch_size, num_processes)
    order = torch.randperm(num_rows, generator=generator)
    mega_batches = order.split(step_rows * mega_batch_mult)
    order = torch.cat([mb[lengths[mb].argsort(descending=True, stable=True)] for mb in mega_batches])
    steps = list(order[: full_steps * step_rows].split(step_rows)) if full_steps else []
    steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    if steps:
        longest = max(range(len(steps)), key=lambda i: int(lengths[steps[i][0]]))  # each step is sorted
        steps[0], steps[longest] = steps[longest], steps[0]
    batches = [batch for step in steps for batch in step.split(batch_size)]
    if tail_batches:
        batches += order[num_rows - tail_rows:].tensor_split(tail_batches)
    return [batch.tolist() for batch in batches]


class LengthGroupedBatchSampler:
    """Length-grouped training batches whose order is a pure function of (seed, epoch).

    So every process computes the same batches and accelerate's BatchSamplerShard hands each
    process its own (batch i goes to process i % num_processes), and a resumed run that calls
    `set_epoch(epoch)` and skips the batches already done sees exactly what an uninterrupted run saw.
    Deliberately no `batch_size` attribute: BatchSamplerShard then takes the batches as they
    are (the tail ones are smaller) instead of topping the last step up with repeated rows.
    """

    def __init__(self, lengths, batch_size, num_processes=1, seed=0, mega_batch_mult=50):
        if len(lengths) < num_processes:
            raise UsageError(f"{len(lengths)} training rows cannot be shared by {num_processes} processes.")
        self.lengths = torch.as_tensor(lengths)
        self.rows_per_batch = batch_size
        self.num_processes = num_processes
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def sampler(self):
        """Under BatchSamplerShard, DataLoaderShard.set_epoch reaches us as `.batch_sampler.sampler`."""
        return self

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # no (seed, epoch) clashes
        yield from length_grouped_batches(
            self.lengths, self.rows_per_batch, self.num_processes, generator, self.mega_batch_mult
        )

    def __len__(self):
        full_steps, _, tail_batches = step_plan(len(self.lengths), self.rows_per_batch, self.num_processes)
        return full_steps * self.num_processes + tail_batches


class LengthSortedSampler(Sampler):
    """Evaluation rows longest first: each batch pads to almost nothing, and memory peaks at once.

    `evaluate` puts the predictions back in dataset order with the `row` column.
    """

    def __init__(self, lengths):
        self.order = torch.as_tensor(lengths).argsort(descending=True, stable=True).tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def build_collator(tokenizer, mixed_precision):
    """Pads each batch to its longest row; multiples of 8 let fp16/bf16 tensor cores work on whole tiles."""
    multiple = 8 if mixed_precision in ("fp16", "bf16") else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


def build_dataloaders(train_ds, eval_ds, collator, train_batch_size, eval_batch_size, seed, num_workers=0,
                      group_by_length=True, num_processes=None, pin_memory=False):
    """Training batches in a seeded order that depends only on `seed` and the epoch; evaluation
    batches sorted by length, their rows numbered so results can be put back in dataset order.

    group_by_length: batches of similar-length rows (see `length_grouped_batches`); else a plain
    shuffle. num_processes: how many processes will share the batches (default: as launched).
    pin_memory: batches in page-locked host memory, which a GPU copies from without the CPU waiting.
    Every loader draws on its own seeded generator (the order, and the seed each new iterator
    takes), never on the global torch RNG, which also drives dropout: a resumed run then sees
    exactly the dropout masks of an uninterrupted one.
    """
    if group_by_length:
        num_processes = num_processes or PartialState().num_processes  # the tail is spread over this many
        order = {"batch_sampler": LengthGroupedBatchSampler(token_lengths(train_ds), train_batch_size,
                                                            num_processes, seed)}
    else:
        order = {"shuffle": True, "batch_size": train_batch_size}
    train_dl = DataLoader(
        train_ds,
        **order,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals if num_workers else None,
        generator=torch.Generator().manual_seed(seed),  # the shuffle, and the worker seed of each new iterator
    )
    eval_dl = None
    if eval_ds is not None:
        eval_dl = DataLoader(
            with_row_numbers(eval_ds),
            sampler=LengthSortedSampler(token_lengths(eval_ds)),
            batch_size=eval_batch_size,
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals if num_workers else None,
            generator=torch.Generator().manual_seed(seed),
        )
    return train_dl, eval_dl


def ignore_stop_signals(worker_id):
    """Loader workers ignore Ctrl-C and SIGTERM: the training process decides when to stop (it saves a
    checkpoint first), and a worker dying on the signal would end the run with an error instead."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def steps_per_epoch(num_batches, gradient_accumulation_steps):
    """Optimizer steps in one pass over `num_batches` micro-batches (the last partial window steps too)."""
    return math.ceil(num_batches / gradient_accumulation_steps)
