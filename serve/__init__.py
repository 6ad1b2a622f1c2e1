"""Serving a fine-tuned model: a web page and a JSON API (app.py), a command line (predict.py).

Three layers (HTTP, the batching core, the model), kept apart as Text Embeddings Inference keeps
its router, core and backends:

    app.py          HTTP: config, request checks, routes, errors          python -m serve
    batching.py     limits, input validation, the batching worker
    classifier.py   the loaded model behind the worker: padded batches, split by length
    packed.py       packed batches: no padding at all (a BERT model on a CPU)
    predict.py      the same worker from the command line                 python -m serve.predict

Imports run one way: this package uses the training modules (model_utils, errors), never the reverse.
"""
