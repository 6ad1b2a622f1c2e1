"""Run under `accelerate launch --num_processes 2`: write the rows this process trains on in epoch 0.

Built by train_loop's own setup path (`build`), so the test checks the real data path after `prepare`.
"""

import json
import sys

import train_loop

cfg = train_loop.parse_config(sys.argv[2:])
setup = train_loop.build(cfg)
train_dl = setup.accelerator.prepare(setup.train_dl)
rows = []
for epoch in (0, 1):
    train_dl.set_epoch(epoch)
    for batch in train_dl:
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            rows.append([epoch, [i for i, m in zip(ids, mask) if m]])  # strip the padding
with open(f"{sys.argv[1]}.{setup.accelerator.process_index}", "w") as f:
    json.dump(rows, f)
