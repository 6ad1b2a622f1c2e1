"""The model card: README.md in the folder for serving and in each checkpoint, as Trainer writes one.

Built with huggingface_hub's ModelCard and ModelCardData, so the Hub reads its metadata: the base
model, the dataset, the task, the labels, the final evaluation as model-index results (what the Hub
shows as "Evaluation results"), the training hyperparameters and the framework versions that
`Trainer.create_model_card` records. `huggingface-cli upload` sends the folder as it is (README).
"""

import json
import os
import platform

import accelerate
import datasets
import tokenizers
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import model_utils

# The metrics of an evaluation, under the names the Hub's model-index uses.
METRICS = {"eval_accuracy": ("accuracy", "Accuracy"), "eval_f1": ("f1", "F1"),
           "eval_precision": ("precision", "Precision"), "eval_recall": ("recall", "Recall"),
           "eval_loss": ("loss", "Loss")}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

This model is a fine-tuned version of {{ base_model_text }} on {{ dataset_text }}, trained with
train_loop.py (an explicit PyTorch + Accelerate loop).
{% if results %}
It achieves the following results on the evaluation set ({{ eval_split }} split, {{ eval_samples }} rows):
{% for name, value in results %}
- {{ name }}: {{ value }}
{%- endfor %}
{% endif %}
## How to use

```python
from transformers import pipeline

classifier = pipeline("text-classification", model="{{ model_name }}")  # this folder, or its Hub id once uploaded
classifier("A film that stays with you for days.")  # labels: {{ labels }}
```

## Training procedure

### Training hyperparameters

The following hyperparameters were used during training:
{% for name, value in hyperparameters %}
- {{ name }}: {{ value }}
{%- endfor %}

### Framework versions
{% for name, value in versions %}
- {{ name }} {{ value }}
{%- endfor %}
"""


def build_model_card(cfg, label_names, num_processes, mixed_precision, results=None, step=None):
    """A ModelCard for a model trained with `cfg`. `results`: an evaluation of this very model (the
    final one, or the checkpoint's step's), written as model-index eval results; None writes none."""
    base_model = hub_model_id(cfg.model_name_or_path)
    dataset = dataset_id(cfg.dataset_name)
    eval_results = model_index(results, dataset, cfg.eval_split) if results else None
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset],
        pipeline_tag="text-classification",
        library_name="transformers",
        tags=["generated_from_train_loop", "text-classification"],
        metrics=[METRICS[k][0] for k in METRICS if results and k in results] or None,
        model_name=os.path.basename(os.path.normpath(cfg.final_model_dir)) if step is None else f"checkpoint-{step}",
        eval_results=eval_results,
        label_names=list(label_names),  # not a Hub field; the order of the classifier's outputs
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=card_data.model_name,
        base_model_text=f"[{base_model}](https://huggingface.co/{base_model})" if base_model
        else f"a local model ({cfg.model_name_or_path})",
        dataset_text=f"the {dataset} dataset" + ("" if dataset == cfg.dataset_name else f" (read from {cfg.dataset_name})"),
        eval_split=cfg.eval_split,
        eval_samples=(results or {}).get("eval_samples"),
        results=[(METRICS[k][1], round(results[k], 4)) for k in METRICS if k in results] if results else [],
        labels=", ".join(label_names),
        hyperparameters=list(hyperparameters(cfg, num_processes, mixed_precision).items()),
        versions=list(framework_versions().items()),
    )


def for_run(run, step=None):
    """The card of the model a run holds now: for checkpoint-`step`, or (step None) for serving.
    Its evaluation is the one at this very step, if one ran (the final one, or the best model's)."""
    evaluated = run.last_eval is not None and run.last_eval["step"] == run.progress.global_step
    results = {**run.last_eval["results"], "eval_samples": len(run.eval_dl.dataset)} if evaluated else None
    model = run.accelerator.unwrap_model(run.model)
    return build_model_card(run.cfg, model_utils.label_names(model), run.accelerator.num_processes,
                            run.accelerator.mixed_precision, results, step)


def model_index(results, dataset, split):
    """One EvalResult per metric: the Hub's model-index, shown on the model's page."""
    return [EvalResult(task_type="text-classification", task_name="Text Classification", dataset_type=dataset,
                       dataset_name=dataset, dataset_split=split, metric_type=metric, metric_name=name,
                       metric_value=float(results[key]))
            for key, (metric, name) in METRICS.items() if key in results]


def hyperparameters(cfg, num_processes, mixed_precision):
    """What Trainer's card lists (transformers' modelcard.extract_hyperparameters_from_trainer), plus
    weight decay and the precision by name."""
    total = cfg.per_device_train_batch_size * num_processes * cfg.gradient_accumulation_steps
    values = {
        "learning_rate": cfg.learning_rate,
        "train_batch_size": cfg.per_device_train_batch_size,
        "eval_batch_size": cfg.per_device_eval_batch_size,
        "seed": cfg.seed,
        "num_devices": num_processes,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "total_train_batch_size": total,
        "optimizer": f"{cfg.optim} with betas=({cfg.adam_beta1},{cfg.adam_beta2}), epsilon={cfg.adam_epsilon}",
        "weight_decay": cfg.weight_decay,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "lr_scheduler_warmup_steps": cfg.warmup_steps,
        "mixed_precision": mixed_precision,
        "max_length": cfg.max_length,
    }
    values.update({"training_steps": cfg.max_steps} if cfg.max_steps > 0 else {"num_epochs": cfg.num_train_epochs})
    if cfg.label_smoothing_factor:
        values["label_smoothing_factor"] = cfg.label_smoothing_factor
    return values


def framework_versions():
    return {"Python": platform.python_version(), "Transformers": transformers.__version__,
            "Pytorch": torch.__version__, "Accelerate": accelerate.__version__, "Datasets": datasets.__version__,
            "Tokenizers": tokenizers.__version__}


def hub_model_id(name_or_path):
    """The Hub id a run started from: --model_name_or_path itself when it is one; for a local folder,
    the id its config.json records (`_name_or_path`, written by the save that made the folder) when
    that is one. None otherwise: the Hub refuses a card whose base_model is no model id."""
    if not os.path.isdir(name_or_path):
        return name_or_path if is_repo_id(name_or_path) else None
    try:
        with open(os.path.join(name_or_path, "config.json")) as f:
            recorded = json.load(f).get("_name_or_path", "")
    except (OSError, ValueError):
        return None
    return recorded if is_repo_id(recorded) and not os.path.isdir(recorded) else None


def dataset_id(dataset_name):
    """The dataset's name on the Hub: --dataset_name when it is a Hub id; for a local folder, the
    folder's name (../shared/data/imdb is imdb); for data files, the first file's name."""
    if is_repo_id(dataset_name) and not os.path.exists(dataset_name):
        return dataset_name
    first = dataset_name.split(",")[0].split("=")[-1]
    return os.path.splitext(os.path.basename(os.path.normpath(first)))[0]


def is_repo_id(name):
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(name)
