"""Why the model decided: which words moved the prediction, and where its attention went.

    from training.explain import Explainer
    explainer = Explainer(model, tokenizer)                  # a trained classifier, its tokenizer
    e = explainer.explain("A wonderful, moving film.")
    e.label, e.words, e.attributions["pos"], e.deltas     # the words with their share of P(pos)
    tokens, maps = explainer.attention("A wonderful, moving film.")        # (layers, heads, T, T)

Attributions are Integrated Gradients (Sundararajan et al., 2017), computed by PyTorch's Captum.
For one class c and the model's probability f(x) = P(c | x), they answer: of the change in P(c)
from a baseline input x' (here: the same text with every word replaced by [PAD]) to the real
input x, how much does each token account for? IG walks the straight line from x' to x in the
token-embedding space and adds up the gradient along it:

    IG_i = (x_i - x'_i) . integral_0^1 dP(c)/dx_i (x' + a (x - x')) da      (summed over the
                                                                             embedding dimension)

The integral is a sum over `n_steps` points (Gauss-Legendre), and by construction the token
scores add up to f(x) - f(x') ("completeness"); what they miss is Captum's convergence delta,
reported with every explanation. Why not the plain gradient dP/dx at x: a confident model sits
where the softmax is flat, so the gradient there is near zero for the very words that made it
confident (saturation). The path integral collects the gradient where the prediction changed.

Scores are in units of probability: +0.30 for a word under "pos" means the word accounts for 0.30
of P(pos)'s rise over the baseline. The classes' scores for one word add up to zero (the
probabilities always sum to one).

Words are the text split at whitespace: a word's score is the sum of its WordPiece tokens' scores
("unwatchable" -> "un", "##watch", "##able"), so completeness still holds per word. [CLS] and
[SEP] are the same in the input and the baseline and so score exactly zero.

Attention maps are the softmax weights each layer's heads put on each token, read from the
model's own outputs (`output_attentions=True`, which only the eager attention returns: SDPA's
fused kernel never forms the matrix). They show where the model looked, not why it decided:
attention is one input to the next layer's arithmetic, not an explanation by itself.
"""

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from captum.attr import LayerIntegratedGradients

from model_utils import bare_tokenizer, label_names, model_max_length

# Gauss-Legendre points along the path. With MiniLM fine-tuned on IMDb, 32 leave a convergence delta
# of 0.1-4% of the change explained and take about a second for a short review on 2 CPU cores;
# some reviews need 64 or more (inspect_model.py warns). BENCHMARKS.md: the cost and delta per count.
N_STEPS = 32


@dataclass
class Word:
    """One whitespace-separated word of the text: text[start:end], made of `tokens` (positions)."""

    text: str
    start: int
    end: int
    tokens: list


@dataclass
class Explanation:
    """Why `text` was classified as `label`: per-word (and per-token) scores for each explained class."""

    label: str  # the predicted class
    scores: dict  # class -> probability, for the (possibly truncated) input that was explained
    words: list  # Word, in text order: the part of the text the model saw
    attributions: dict  # class -> one score per word (units of that class's probability)
    tokens: list  # the WordPiece tokens, [CLS] and [SEP] included
    token_attributions: dict  # class -> one score per token
    deltas: dict  # class -> Captum's convergence delta: sum of scores - (f(x) - f(baseline))
    baseline_scores: dict  # class -> probability of the all-[PAD] baseline
    truncated: bool  # the text had more than max_length tokens; only the kept part is explained
    max_length: int
    n_steps: int

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# the explainer: a model, its tokenizer, and the two questions


class Explainer:
    """A classifier and its tokenizer, set up once to explain any number of texts.

    Texts over `max_length` tokens (default: the model's maximum) are cut as prediction cuts
    them, and only the kept part is explained (`Explanation.truncated` says so).
    """

    def __init__(self, model, tokenizer, max_length=None, pad_to_multiple_of=1):
        self.model = model.eval()  # no dropout: an explanation must not depend on a random mask
        self.core = bare_tokenizer(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.labels = label_names(model)
        self.max_length = max_length or model_max_length(model, tokenizer)
        # A server pads each text to a multiple of this many tokens (masked [PAD]s, whose scores are
        # exactly 0), so that its explanations run a bounded set of shapes (serve/explaining.py).
        self.pad_to_multiple_of = pad_to_multiple_of

    def explain(self, text, classes=None, n_steps=N_STEPS, internal_batch_size=None, truncation_side="right"):
        """Integrated Gradients for `text`, for each class in `classes` (names; default: all).

        One Captum call explains every class: the input is repeated once per class with its own
        target, and the n_steps points of every path go through the model together in one batch
        (or in chunks of `internal_batch_size` rows, which changes memory, not the result). With
        every class asked for, one class fewer is computed (below).
        """
        classes = self.labels if classes is None else list(classes)
        if not classes:
            raise ValueError(f"no class to explain: name one or more of {self.labels}, or none for all")
        targets = [self.class_index(c) for c in classes]
        computed = self.computed_targets(targets)
        derive_last = len(computed) < len(targets)
        encoding, truncated = self.encode(text, truncation_side)
        n_tokens = len(encoding.ids)
        padding = self.padding(n_tokens)
        input_ids = torch.tensor([encoding.ids + [self.pad_token_id] * padding], device=self.model.device)  # (1, T)
        baseline_ids = pad_baseline(input_ids, encoding.special_tokens_mask + [0] * padding, self.pad_token_id)
        real = torch.arange(input_ids.shape[1], device=input_ids.device) < n_tokens  # (T,): not the padding

        def probabilities(ids):  # the padding masked out: the same probabilities as without it
            return self.probabilities(ids, attention_mask=real.expand_as(ids).long())

        k = len(computed)
        ig = LayerIntegratedGradients(probabilities, self.model.get_input_embeddings())
        with torch.enable_grad():  # the caller may be under no_grad; IG needs the backward pass
            token_scores, deltas = ig.attribute(
                input_ids.expand(k, -1), baseline_ids.expand(k, -1), target=computed, n_steps=n_steps,
                internal_batch_size=internal_batch_size, return_convergence_delta=True,
            )  # (k, T, hidden): one score per embedding dimension; (k,)
        with torch.no_grad():
            probs = probabilities(torch.cat([input_ids, baseline_ids]))  # (2, num_labels)
        per_token = token_scores[:, :n_tokens].float().sum(dim=-1)  # (k, n_tokens): a real token's score, summed over its embedding
        deltas = deltas.float()
        if derive_last:
            per_token = torch.cat([per_token, -per_token.sum(dim=0, keepdim=True)])
            deltas = torch.cat([deltas, -deltas.sum(dim=0, keepdim=True)])
            k += 1
        words = whitespace_words(text, encoding)
        per_word = [[sum(per_token[i, w.tokens].tolist()) for w in words] for i in range(k)]
        return Explanation(
            label=self.labels[int(probs[0].argmax())],
            scores=dict(zip(self.labels, probs[0].tolist())),
            words=words,
            attributions=dict(zip(classes, per_word)),
            tokens=encoding.tokens,
            token_attributions=dict(zip(classes, per_token.tolist())),
            deltas=dict(zip(classes, deltas.tolist())),
            baseline_scores=dict(zip(self.labels, probs[1].tolist())),
            truncated=truncated,
            max_length=self.max_length,
            n_steps=n_steps,
        )

    def computed_targets(self, targets):
        """The classes IG really runs for. It is linear in the function explained, and the
        probabilities sum to one: so all classes' scores sum to zero, and with every class asked for,
        the last is minus the others' sum (its delta too). For two classes that halves the work."""
        every_class = sorted(targets) == list(range(len(self.labels))) and len(targets) > 1
        return targets[:-1] if every_class else targets

    def rows_per_point(self, classes=None):
        """Rows one point of the path costs (the inputs Captum repeats per computed class)."""
        names = self.labels if classes is None else classes
        return len(self.computed_targets([self.class_index(c) for c in names]))

    def attention(self, text, truncation_side="right"):
        """(tokens, attention (layers, heads, T, T)): row i of a head is how token i spread its
        attention over the T tokens; each row sums to 1. Computed with the eager attention (the only
        one that returns the weights), switched on for this call and back after."""
        encoding, _ = self.encode(text, truncation_side)
        input_ids = torch.tensor([encoding.ids], device=self.model.device)
        with eager_attention(self.model), torch.no_grad():
            outputs = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_attentions=True)
        return encoding.tokens, torch.stack(outputs.attentions)[:, 0].float()  # L x (1, H, T, T) -> (L, H, T, T)

    def probabilities(self, ids, attention_mask=None):
        """(rows, T) token ids -> (rows, num_labels) class probabilities: what is explained is P(class)."""
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        return self.model(input_ids=ids, attention_mask=mask).logits.float().softmax(dim=-1)

    def padding(self, n_tokens):
        """[PAD]s after a text of `n_tokens`: up to a multiple of pad_to_multiple_of, within max_length."""
        multiple = self.pad_to_multiple_of
        return max(0, min(-(-n_tokens // multiple) * multiple, self.max_length) - n_tokens)

    def class_index(self, name):
        if name not in self.labels:
            raise ValueError(f"unknown class {name!r}: the model's classes are {self.labels}")
        return self.labels.index(name)

    def encode(self, text, truncation_side="right"):
        """(the tokenizer's Encoding of `text` with [CLS]/[SEP], whether it had to be cut to max_length)."""
        pieces = self.core.encode(text, add_special_tokens=False)
        room = self.max_length - self.core.num_special_tokens_to_add(False)
        truncated = len(pieces.ids) > room
        if truncated:
            pieces.truncate(room, direction=truncation_side)
        return self.core.post_process(pieces), truncated


def explain(model, tokenizer, text, **options):
    """One text's Explanation; `options` as Explainer.explain takes them."""
    return Explainer(model, tokenizer).explain(text, **options)


def attention_maps(model, tokenizer, text, **options):
    """One text's (tokens, attention (layers, heads, T, T)); `options` as Explainer.attention takes them."""
    return Explainer(model, tokenizer).attention(text, **options)


# -----------------------------------------------------------------------------
# the pieces


def pad_baseline(input_ids, special_tokens_mask, pad_token_id):
    """The input with every real token replaced by [PAD]; [CLS] and [SEP] stay (the same in both)."""
    special = torch.tensor([special_tokens_mask], dtype=torch.bool, device=input_ids.device)
    return torch.where(special, input_ids, torch.full_like(input_ids, pad_token_id))


def whitespace_words(text, encoding):
    """The text's words (split at whitespace), each with the positions of the tokens it is made of.

    Every real token belongs to exactly one word: a token joins the word before it unless the text
    between them holds whitespace. Special tokens ([CLS], [SEP]) have no characters and join none.
    """
    words = []
    for position, (start, end) in enumerate(encoding.offsets):
        if encoding.special_tokens_mask[position]:
            continue
        if words and not any(ch.isspace() for ch in text[words[-1].end:start]):
            words[-1].end = end
            words[-1].tokens.append(position)
        else:
            words.append(Word("", start, end, [position]))
    for word in words:
        word.text = text[word.start:word.end]
    return words


@contextmanager
def eager_attention(model):
    """The eager attention for the duration: the only implementation that returns its weights."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
