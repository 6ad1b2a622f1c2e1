"""Serving a fine-tuned model: a web page and a JSON API (app.py), a command line (predict.py).

Three layers (HTTP, the batching core, the model), kept apart as Text Embeddings Inference keeps
its router, core and backends:

    app.py          HTTP: config, the routes ("validate, queue, answer"), startup   python -m serve
    http_types.py   HTTP: request and response types, errors as TEI's JSON body and status
    body_limit.py   HTTP: the request body limit (413), as a middleware
    model_state.py  the served model's state: loading in the background, ready or failed
    ecosystem.py    HTTP: TEI's /predict body and answer, the Hub's POST /, TEI's timing headers
    metrics.py      HTTP: Prometheus metrics, request ids, one log line per request
    batching.py     limits, input validation, the batching worker
    classifier.py   the loaded model behind the worker: each batch tokenized, padded batches split by length
    packed.py       packed batches: no padding at all (a BERT model on a CPU)
    explaining.py   POST /explain: training/explain.py's Integrated Gradients on a model copy, a thread and a cap of its own
    memory.py       why the memory stops growing (a bounded set of packed shapes), and what /info says of it
    predict.py      the same worker from the command line                 python -m serve.predict

Imports run one way: this package uses the training modules (model_utils,
training/errors.py, training/explain.py), never the reverse.
"""
