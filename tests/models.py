"""The models and data paths of the tests: one tiny-BERT builder, and where ../shared lives.

Everything tiny is built here, offline, in a second: a 2-layer, hidden-32 BERT with a tokenizer over
a small vocabulary. `save_tiny_bert` writes it as a pretrained encoder (training gives it a fresh
head) or, with `labels`, as a fine-tuned classifier (what the web app serves). The real-weights
tests use ../shared/models/minilm-l6 (22.7M parameters, bert-base-uncased's vocabulary) and the
full IMDb in ../shared/data/imdb.
"""

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

ROOT = Path(__file__).resolve().parents[1]  # the repository: commands run from here
SHARED = ROOT.parent / "shared"  # beside the repository, here and in CI
MINILM = SHARED / "models" / "minilm-l6"
IMDB = SHARED / "data" / "imdb"
IMDB_TEST = IMDB / "plain_text" / "test-00000-of-00001.parquet"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Sentiment words of the synthetic reviews (conftest.make_reviews) and the vocabulary of the tiny
# encoder that learns them: one token per word.
POSITIVE = ["good", "great", "wonderful", "loved", "brilliant", "superb", "fun", "moving"]
NEGATIVE = ["bad", "awful", "boring", "hated", "terrible", "dull", "weak", "mess"]
NEUTRAL = ["the", "movie", "film", "was", "a", "plot", "actors", "and", "it", "story", "really", "quite"]
REVIEW_VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL

# The served classifier's vocabulary: common review words plus single characters and their ##
# continuations, so any text (emoji, other scripts) tokenizes to something other than [UNK] alone.
WORDS = """the a an and or but not no very really quite film movie story plot actor actors acting
cast scene scenes ending music good great wonderful superb brilliant moving funny fun best love
loved bad awful terrible boring dull worst hate hated waste lazy slow long it is was this that
i you we they of to in on for with as at by from time watch watched again never ever""".split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'\"-()")
WORDPIECE_VOCAB = list(dict.fromkeys(SPECIAL + WORDS + LETTERS + ["##" + c for c in LETTERS]))
LABELS = ["neg", "pos"]


def tiny_bert_config(**overrides):
    """The tiny BERT's shape: hidden 32, 2 layers, 4 heads, feed-forward 64; anything else by keyword."""
    return BertConfig(**{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 64, **overrides})


def save_tiny_bert(path, vocab=REVIEW_VOCAB, max_length=64, labels=None, seed=0, **config):
    """A random tiny BERT and its tokenizer in `path`, as save_pretrained writes them; returns the path.

    labels=None: a bare encoder, like a pretrained checkpoint. labels=["neg", "pos"]: a
    BertForSequenceClassification with those label names, like a fine-tuned model. The position
    table holds `max_length` tokens, and so does the tokenizer (model_max_length), so that
    pipeline(truncation=True) and our classify() cut at the same place.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(vocab)}
    # transformers 5 takes the vocabulary as `vocab=`; the old `vocab_file=` is silently ignored
    # (every word would become [UNK]).
    BertTokenizer(vocab=ids, model_max_length=max_length).save_pretrained(path)
    head = {} if labels is None else {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                                      "label2id": {name: i for i, name in enumerate(labels)}}
    cfg = tiny_bert_config(vocab_size=len(ids), max_position_embeddings=max_length, **head, **config)
    torch.manual_seed(seed)
    model = BertModel(cfg) if labels is None else BertForSequenceClassification(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_served_tiny_bert(path, max_length=64):
    """The tiny classifier the serving tests load: WordPiece vocabulary, labels neg/pos."""
    # initializer_range 0.3, not 0.02: larger random weights make texts score differently (0.3-0.8)
    return save_tiny_bert(path, WORDPIECE_VOCAB, max_length, labels=LABELS, initializer_range=0.3)


def save_minilm_classifier(out_dir):
    """minilm-l6's real encoder + a seeded head, saved with label names like a fine-tuned model."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        MINILM, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}
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
