"""Model folders for the serving tests, written the way train_loop.py saves its result.

`save_tiny_bert`: a random 2-layer BERT with a small vocabulary, built in a second (fast tests).
`save_minilm_classifier`: ../shared/models/minilm-l6 (real weights, bert-base-uncased vocabulary)
with a seeded 2-label head (real-weights checks: pipeline equality, the browser test).
"""

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertTokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
MINILM = SHARED / "models" / "minilm-l6"
IMDB_TEST = SHARED / "data" / "imdb" / "plain_text" / "test-00000-of-00001.parquet"
ID2LABEL = {0: "neg", 1: "pos"}
LABEL2ID = {"neg": 0, "pos": 1}

WORDS = """the a an and or but not no very really quite film movie story plot actor actors acting
cast scene scenes ending music good great wonderful superb brilliant moving funny fun best love
loved bad awful terrible boring dull worst hate hated waste lazy slow long it is was this that
i you we they of to in on for with as at by from time watch watched again never ever""".split()


def save_tiny_bert(out_dir, max_length=64):
    """A random BERT (hidden 32, 2 layers, 4 heads) + WordPiece tokenizer; truncates at `max_length`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'\"-()")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + ["##" + c for c in letters]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    # transformers 5 takes the vocabulary as `vocab=`; the old `vocab_file=` is silently ignored
    # (every word would become [UNK]). model_max_length = the position table, so
    # pipeline(truncation=True) and classify() cut at the same place.
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=max_length)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_length, num_labels=2,
        id2label=ID2LABEL, label2id=LABEL2ID,
        initializer_range=0.3,  # not 0.02: larger random weights make texts score differently (0.3-0.8)
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_minilm_classifier(out_dir):
    """minilm-l6's real encoder + a seeded head, saved with label names like a fine-tuned model."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        MINILM, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID
    )
    scale_head(model)
    tokenizer = BertTokenizer.from_pretrained(MINILM)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def scale_head(model):
    """A fresh head gives probabilities near 0.5 for every text; a larger one spreads them out,
    so labels differ between texts and equality checks compare more than a constant."""
    with torch.no_grad():
        model.classifier.weight.mul_(40)
