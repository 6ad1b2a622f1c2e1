"""Run under `accelerate launch --num_processes 2`: write the rows this process trains on in epoch 0.

Built from train_loop's own functions, so the test checks the real data path after `prepare`.
"""

import json
import sys

import train_loop
from model_utils import load_tokenizer

cfg = train_loop.parse_config(sys.argv[2:])
accelerator = train_loop.build_accelerator(cfg)
splits, label_names = train_loop.load_data(cfg)
tokenizer = load_tokenizer(cfg.model_name_or_path)
train_ds, eval_ds = train_loop.tokenize_data(cfg, splits, label_names, tokenizer, accelerator)
collator = train_loop.data.build_collator(tokenizer, accelerator.mixed_precision)
train_dl, _ = train_loop.data.build_dataloaders(train_ds, None, collator, cfg.per_device_train_batch_size,
                                                cfg.per_device_eval_batch_size, cfg.seed)
train_dl = accelerator.prepare(train_dl)
rows = []
for epoch in (0, 1):
    train_dl.set_epoch(epoch)
    for batch in train_dl:
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            rows.append([epoch, [i for i, m in zip(ids, mask) if m]])  # strip the padding
with open(f"{sys.argv[1]}.{accelerator.process_index}", "w") as f:
    json.dump(rows, f)
