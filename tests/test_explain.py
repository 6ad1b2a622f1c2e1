"""training/explain.py: Integrated Gradients attributions and attention maps, checked by their properties.

Completeness (the scores add up to f(input) - f(baseline)), a model trained here to key on one
word giving that word the largest score, determinism, batching that changes nothing, word merging,
truncation, and attention rows that are distributions.
"""

import random

import pytest
import torch
from matplotlib.image import imread
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import inspect_model
from conftest import usage_error
from training.explain import N_STEPS, Explainer
from models import LABELS, MINILM, NEUTRAL, save_minilm_classifier, save_tiny_bert

REVIEW = "The acting was superb, though the plot felt unwatchable at times. I loved the ending!"
KEY_WORD = "wonderful"  # the one word the keyed model learns to look for


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(model, tokenizer): minilm-l6's real encoder and WordPiece vocabulary with a seeded 2-label head."""
    if not MINILM.is_dir():
        pytest.skip(f"{MINILM} is missing (the shared test model)")
    path = save_minilm_classifier(tmp_path_factory.mktemp("minilm") / "model")
    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """(model, tokenizer): a tiny BERT trained here until it calls a text positive exactly when
    KEY_WORD is in it; the other words are neutral filler it must learn to ignore."""
    # Larger initial weights (0.3, not 0.02) and a short training: with tiny embeddings the straight
    # path from [PAD] to a word passes near the zero vector, where the embeddings' LayerNorm divides
    # by almost nothing, and an over-trained model jumps from 0 to 1 within one step of the path;
    # either way 32 points cannot follow the gradient (the convergence delta says so).
    path = save_tiny_bert(tmp_path_factory.mktemp("keyed"), labels=LABELS, initializer_range=0.3)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels = keyed_reviews(512, seed=0)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(60):
        rows = torch.randint(0, len(texts), (64,))
        loss = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                     labels=targets[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)  # the trained weights, for the command line's --model_dir
    return model.eval(), tokenizer, path


def keyed_reviews(n, seed):
    """n texts of 5-8 neutral words; every other one has KEY_WORD at a random place and label 1.

    [PAD] is one of the neutral words. The baseline IG starts from is the text with every word
    replaced by [PAD], and it must mean "no evidence" for the scores to mean anything (a model
    that never saw an unmasked [PAD] may call it anything). A fine-tuned BERT's baseline is
    checked in docs/explain.md.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = rng.choices(NEUTRAL + ["[PAD]"] * 3, k=rng.randint(5, 8))
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), KEY_WORD)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return texts, labels


# -----------------------------------------------------------------------------
# Integrated Gradients


def test_scores_add_up_to_the_change_in_probability(minilm):
    """Completeness, per class: the word scores sum to P(class | text) - P(class | baseline), and
    what they miss is Captum's convergence delta, small at the default step count."""
    explanation = Explainer(*minilm).explain(REVIEW)
    assert explanation.n_steps == N_STEPS
    assert set(explanation.attributions) == set(LABELS)
    for label in LABELS:
        change = explanation.scores[label] - explanation.baseline_scores[label]
        total = sum(explanation.attributions[label])
        assert abs(explanation.deltas[label]) < 2e-3
        assert total - change == pytest.approx(explanation.deltas[label], abs=1e-5)
        assert total == pytest.approx(sum(explanation.token_attributions[label]), abs=1e-6)
    # Two classes: the probabilities sum to one, so each word's two scores cancel.
    for neg, pos in zip(explanation.attributions["neg"], explanation.attributions["pos"]):
        assert neg == pytest.approx(-pos, abs=1e-4)
    assert explanation.label == max(explanation.scores, key=explanation.scores.get)


def test_the_prediction_is_the_models_own(minilm):
    model, tokenizer = minilm
    explanation = Explainer(model, tokenizer).explain(REVIEW)
    with torch.no_grad():
        probs = model(**tokenizer(REVIEW, return_tensors="pt")).logits.softmax(-1)[0]
    assert [explanation.scores[label] for label in LABELS] == pytest.approx(probs.tolist(), abs=1e-5)


def test_more_steps_converge(minilm):
    """The delta shrinks as the integral's points grow: the sum approximates the integral."""
    explainer = Explainer(*minilm)
    coarse, fine = (abs(explainer.explain(REVIEW, n_steps=n).deltas["pos"]) for n in (4, 64))
    assert fine < coarse


def test_the_key_word_gets_the_largest_score(keyed):
    model, tokenizer, _ = keyed
    explainer = Explainer(model, tokenizer)
    for text in ("the movie was wonderful and the plot", "wonderful film really", "it was quite a story wonderful"):
        explanation = explainer.explain(text)
        assert explanation.label == "pos"
        scores = explanation.attributions["pos"]
        words = [w.text for w in explanation.words]
        assert words[max(range(len(scores)), key=scores.__getitem__)] == KEY_WORD
        assert scores[words.index(KEY_WORD)] > 0.5 * sum(scores)  # it carries most of the rise
        assert explanation.baseline_scores["pos"] < 0.1  # the rise is (nearly) the whole prediction
    assert explainer.explain("the movie was a plot and it").label == "neg"


def test_deterministic_and_batching_changes_nothing(minilm):
    explainer = Explainer(*minilm)
    first = explainer.explain(REVIEW, n_steps=16)
    again = explainer.explain(REVIEW, n_steps=16)
    assert first.token_attributions == again.token_attributions  # bitwise: eval mode, no randomness
    chunked = explainer.explain(REVIEW, n_steps=16, internal_batch_size=5)  # 2 classes x 16 points in 7 chunks
    for label in LABELS:
        assert chunked.token_attributions[label] == pytest.approx(first.token_attributions[label], abs=1e-6)


def test_padding_bounds_the_shapes_and_changes_no_score(minilm):
    """A server pads an explanation to a multiple of 16 tokens (masked [PAD]s): the forward passes get a
    bounded set of lengths, and every score, probability and delta stays what it was, to float rounding."""
    model, tokenizer = minilm
    plain, padded = Explainer(model, tokenizer), Explainer(model, tokenizer, pad_to_multiple_of=16)
    assert [padded.padding(n) for n in (1, 15, 16, 17, 510, 512)] == [15, 1, 0, 15, 2, 0]  # 512: the maximum
    lengths = []
    hook = model.bert.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        expected, got = plain.explain(REVIEW, n_steps=16), padded.explain(REVIEW, n_steps=16)
    finally:
        hook.remove()
    n_tokens = len(expected.tokens)
    assert n_tokens % 16 and got.tokens == expected.tokens  # the padding is real, and never reported
    assert set(lengths) == {n_tokens, -(-n_tokens // 16) * 16}
    for label in LABELS:
        assert got.token_attributions[label] == pytest.approx(expected.token_attributions[label], abs=1e-6)
        assert got.scores[label] == pytest.approx(expected.scores[label], abs=1e-6)
        assert got.deltas[label] == pytest.approx(expected.deltas[label], abs=1e-6)
        assert got.baseline_scores[label] == pytest.approx(expected.baseline_scores[label], abs=1e-6)


def test_one_class_only(minilm):
    explainer = Explainer(*minilm)
    both = explainer.explain(REVIEW, n_steps=8)
    pos = explainer.explain(REVIEW, classes=["pos"], n_steps=8)
    assert list(pos.attributions) == ["pos"]
    assert pos.attributions["pos"] == pytest.approx(both.attributions["pos"], abs=1e-6)
    with pytest.raises(ValueError, match="unknown class 'positive'.*\\['neg', 'pos'\\]"):
        explainer.explain(REVIEW, classes=["positive"])
    with pytest.raises(ValueError, match="no class to explain"):
        explainer.explain(REVIEW, classes=[])
    # Every class, in another order: the derived one is the right one, whichever comes last.
    swapped = explainer.explain(REVIEW, classes=["pos", "neg"], n_steps=8)
    assert list(swapped.attributions) == ["pos", "neg"]
    for label in LABELS:
        assert swapped.attributions[label] == pytest.approx(both.attributions[label], abs=1e-6)
        assert swapped.deltas[label] == pytest.approx(both.deltas[label], abs=1e-6)


# -----------------------------------------------------------------------------
# words and truncation


def test_every_piece_belongs_to_exactly_one_word(minilm):
    model, tokenizer = minilm
    text = "Unwatchable!  Pretentious,\tover-long\nand dull... 10/10 would not rewatch: ünïcode façade"
    explanation = Explainer(model, tokenizer).explain(text, n_steps=4)
    assert [w.text for w in explanation.words] == text.split()
    owners = {}
    for index, word in enumerate(explanation.words):
        assert text[word.start:word.end] == word.text
        for position in word.tokens:
            assert position not in owners
            owners[position] = index
    real = [i for i, token in enumerate(explanation.tokens) if token not in ("[CLS]", "[SEP]")]
    assert sorted(owners) == real
    assert any(len(w.tokens) > 1 for w in explanation.words)  # WordPiece really split some words
    for label in LABELS:  # merging keeps completeness: a word's score is its pieces' sum
        assert sum(explanation.attributions[label]) == pytest.approx(sum(explanation.token_attributions[label]), abs=1e-6)


def test_special_tokens_score_zero(minilm):
    explanation = Explainer(*minilm).explain(REVIEW, n_steps=8)
    assert explanation.tokens[0] == "[CLS]" and explanation.tokens[-1] == "[SEP]"
    for label in LABELS:
        assert explanation.token_attributions[label][0] == 0.0
        assert explanation.token_attributions[label][-1] == 0.0


def test_long_texts_are_explained_on_their_truncated_part(minilm):
    model, tokenizer = minilm
    text = " ".join(f"word{i}" for i in range(400))  # ~1200 tokens, over minilm's 512
    explainer = Explainer(model, tokenizer, max_length=32)
    right = explainer.explain(text, n_steps=4)
    assert right.truncated and right.max_length == 32
    assert len(right.tokens) == 32
    assert right.words[0].text == "word0" and text.startswith(right.words[-1].text, right.words[-1].start)
    kept = tokenizer(text, truncation=True, max_length=32)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(right.tokens) == kept  # cut where prediction cuts
    left = explainer.explain(text, n_steps=4, truncation_side="left")
    assert left.truncated and len(left.tokens) == 32
    assert left.words[-1].text == "word399"
    short = explainer.explain("A short one.", n_steps=4)
    assert not short.truncated


# -----------------------------------------------------------------------------
# attention


def test_attention_rows_are_distributions(minilm):
    model, tokenizer = minilm
    tokens, maps = Explainer(model, tokenizer).attention(REVIEW)
    config = model.config
    assert maps.shape == (config.num_hidden_layers, config.num_attention_heads, len(tokens), len(tokens))
    assert torch.allclose(maps.sum(dim=-1), torch.ones(maps.shape[:-1]), atol=1e-5)
    assert (maps >= 0).all()
    assert tokens[0] == "[CLS]"
    assert model.config._attn_implementation == "sdpa"  # switched back after the eager call


# -----------------------------------------------------------------------------
# inspect_model.py --explain


def test_inspect_model_explains_a_review(keyed, tmp_path, capsys):
    *_, model_dir = keyed
    text = "the plot was wonderful and the actors"
    explanation, maps = inspect_model.main(["--explain", text, "--model_dir", str(model_dir),
                                            "--output_dir", str(tmp_path), "--explain_n_steps", "16"])
    out = capsys.readouterr().out
    assert explanation.label == "pos" and explanation.n_steps == 16
    assert f"predicted pos {explanation.scores['pos']:.3f}" in out
    assert f"the word scores add up to {sum(explanation.attributions['pos']):+.4f}" in out
    assert "most for pos:     wonderful" in out  # the key word leads the list
    width = max(12, *(len(word) for word in text.split()))
    for word, score in zip(explanation.words, explanation.attributions["pos"]):  # every word, in text order
        assert f"\n{word.text:<{width}} {score:>+8.4f}" in out
    assert "raise --explain_n_steps" not in out  # converged
    assert maps.shape[:2] == (2, 4)  # the tiny BERT: 2 layers, 4 heads
    assert sum(line.startswith("  layer ") for line in out.splitlines()) == 2
    for name in ("explain_words.png", "explain_attention.png"):
        picture = imread(tmp_path / name)
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 300
        assert picture[..., :3].std() > 0.05  # not a blank page


def test_inspect_model_explain_refuses_bad_flags(keyed, tmp_path, capsys):
    *_, model_dir = keyed
    base = ["--explain", "a wonderful film", "--model_dir", str(model_dir), "--output_dir", str(tmp_path)]
    assert "unknown class 'positive'" in usage_error(inspect_model.main, base + ["--explain_class", "positive"], capsys)
    assert "--explain_head must be -1 (the mean) or a head from 0 to 3, got 4" in usage_error(
        inspect_model.main, base + ["--explain_head", "4"], capsys)
    assert "--explain_n_steps must be at least 1" in usage_error(inspect_model.main, base + ["--explain_n_steps", "0"], capsys)
    assert "does not exist" in usage_error(inspect_model.main, ["--explain", "x", "--model_dir", str(tmp_path / "none")], capsys)
    assert "no words to explain" in usage_error(inspect_model.main, base[2:] + ["--explain", "   "], capsys)


def test_inspect_model_says_when_the_integral_has_not_converged(keyed, tmp_path, capsys):
    """The keyed model's P(pos) rises from 0.01 to 0.98 along the path: one point cannot follow that."""
    *_, model_dir = keyed
    explanation, _ = inspect_model.main(["--explain", "the plot was wonderful", "--model_dir", str(model_dir),
                                         "--output_dir", str(tmp_path), "--explain_n_steps", "1"])
    change = explanation.scores["pos"] - explanation.baseline_scores["pos"]
    assert abs(explanation.deltas["pos"]) > 0.05 * abs(change)
    assert "raise --explain_n_steps" in capsys.readouterr().out
