"""The training loop's machinery, one concern a module; train_loop.py is the loop and calls these.

    config.py       TrainConfig: the flags (TrainingArguments' names), parsing, checks, did-you-mean
    engines.py      accelerator, DeepSpeed and FSDP, compile, TF32, fused AdamW, and what each
                    engine does differently in a step (RowMean, OverflowCheck)
    checkpoints.py  save, manifest, verify, resolve `latest`, rotation, resume, the best model
    faults.py       stop signals and their agreement, the NaN/inf guard, writable and shared folders
    runlog.py       log records (console, JSON lines, trackers), the log line, the banner
    model_card.py   README.md of the served model and each checkpoint, for the Hub
    hardware.py     whether the CPU multiplies bf16 in hardware
    metrics.py      accuracy, F1, precision, recall as an offline `evaluate` metric
    errors.py       one-paragraph errors and their exit codes, the offline check
    cpu_speed.py    two CPU-only training speed-ups
    study.py        looking inside: activations, per-layer gradients, the profiler
    explain.py      why a trained model decided: Integrated Gradients, attention

Imports run one way: nothing here imports train_loop; serve/ and bench/ use these modules, never
the reverse.
"""
