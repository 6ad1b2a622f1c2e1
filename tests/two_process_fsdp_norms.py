"""Run under `accelerate launch --num_processes 2` (CPU, gloo): one backward pass of a tiny BERT,
measured by study.LayerWatch twice, unsharded and sharded with torch's FSDP2 `fully_shard` (each
BertLayer, then the whole model, as accelerate's FSDP2 plugin wraps it). accelerate does not shard
on a CPU, so torch's own API does it here. Writes both measurements for the test to compare."""

import copy
import json
import sys

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification

from training import study

out, model_dir = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)  # the same model and batch on both processes
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation="eager")
model.eval()  # no dropout: the two passes see the same function
sharded = copy.deepcopy(model)
for layer in sharded.bert.encoder.layer:
    fully_shard(layer)
fully_shard(sharded)
batch = {"input_ids": torch.randint(5, model.config.vocab_size, (4, 12)), "labels": torch.tensor([0, 1, 1, 0])}


def measured(m):
    m(**batch).loss.backward()
    watch = study.LayerWatch(m, accelerator)
    return {"per_layer": watch.per_layer(), "total": watch.total_grad_norm(),
            "sharded": type(next(m.parameters())).__name__,
            "shapes": [list(shape) for _, _, shape, *_ in watch.per_tensor()]}


result = {"plain": measured(model), "fsdp": measured(sharded)}
with open(f"{out}.{accelerator.process_index}", "w") as f:
    json.dump(result, f)
