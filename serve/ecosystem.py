"""The ecosystem's APIs beside our own: Text Embeddings Inference's /predict, and the Hub's POST /.

    POST /predict {"inputs": "A wonderful film."}                 TEI: [{"score": 0.97, "label": "pos"}, {...}]
    POST /predict {"inputs": [["Great!"], ["Dull."]]}              TEI, a batch: one such list per input
    POST /predict {"inputs": "...", "raw_scores": true, "truncate": false, "truncation_direction": "Left"}
    POST /        {"inputs": "Great!", "parameters": {"top_k": 1}} the Hub's, as InferenceClient.text_classification
                                                                   sends it: [[{"label": "pos", "score": 0.97}]]

TEI's shapes, words and status codes come from its source (router/src/http/types.rs and server.rs,
router/src/lib.rs, core/src/tokenization.rs and infer.rs), so that a TEI client needs no change:

- `inputs` is a string; ["a string"] is that string too; [["a"], ["b"]] is a batch (a list of lists).
  A list of two strings is a *pair* of texts in TEI (for cross-encoders), and [["a", "b"]] a batch
  holding a pair: our classifier reads one text at a time, so pairs are refused (422), with the
  batch form in the message, since ["a", "b"] is so easily meant as two texts.
- Error bodies are {"error": ..., "error_type": ...} with TEI's error types, spelt as TEI sends them
  (serde's default: "Validation", not the lower case of its OpenAPI examples); an empty text is
  400 "Empty", too many inputs or a text over the token limit with truncation off is 422 "Validation".
- Scores are sorted, highest first; raw_scores gives the logits instead of the softmax.

The Hub's shape is the Inference API's (the specification in huggingface_hub's generated
TextClassificationInput): one list per input, even for one string, since InferenceClient takes the
first element of the answer. (TEI's own POST / answers a flat list, from which the client then keeps
only the best label: huggingface/huggingface_hub#3539.)
"""

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictInt, WithJsonSchema
from pydantic_core import PydanticCustomError

from serve.batching import InputError, is_encodable
from serve.classifier import sigmoid, softmax


# -----------------------------------------------------------------------------
# errors, in TEI's classes


class ErrorType(str, Enum):
    """TEI's ErrorType (router/src/lib.rs), less Tokenizer, which this server never reports."""

    Unhealthy = "Unhealthy"  # 503: the model is not loaded (yet)
    Backend = "Backend"  # the model failed (TEI: 424; here a 500, which would be a bug)
    Overloaded = "Overloaded"  # 429
    Validation = "Validation"  # 4xx: the request must change
    Empty = "Empty"  # 400: an empty text in TEI's API


ERROR_TYPES = {503: ErrorType.Unhealthy, 429: ErrorType.Overloaded, 500: ErrorType.Backend}


def error_type_for(status):
    """The error type an answer with this status carries, unless the check said otherwise."""
    return ERROR_TYPES.get(status, ErrorType.Validation).value


# -----------------------------------------------------------------------------
# what a request asks for, whatever its style


@dataclass
class Task:
    """A classification request reduced to what the server does with it."""

    style: Literal["ours", "tei", "hub"]
    texts: list
    single: bool  # one input: TEI answers a flat list, and the te_request_count method is "single"
    name: Callable = lambda i: f"texts[{i}]"  # text i in error messages
    truncate: bool = True
    side: Literal["right", "left"] = "right"
    raw_scores: bool = False  # TEI: logits instead of probabilities
    function: Optional[str] = None  # the Hub: "softmax", "sigmoid" or "none"; None: as pipeline() chooses
    top_k: Optional[int] = None  # the Hub: the k best labels; None: all


def bad_inputs(message):
    """A validation error with our own sentence (pydantic's would name the internals)."""
    return PydanticCustomError("inputs", "{message}", {"message": message})


# -----------------------------------------------------------------------------
# TEI's /predict


@dataclass
class Inputs:
    texts: list
    single: bool


def parse_tei_inputs(value):
    """TEI's PredictInput: "text" or ["text"] (one), [["a"], ["b"], ...] (a batch). Pairs are refused."""
    if isinstance(value, str):
        return Inputs([value], single=True)
    if not isinstance(value, list) or not value:
        raise bad_inputs('inputs must be a string, or a batch of one-string lists such as [["Great!"], ["Dull."]]')
    if not isinstance(value[0], list):  # not a batch: one text, or one pair
        return Inputs([one_text(value, "inputs")], single=True)
    return Inputs([one_text(item, f"inputs[{i}]") for i, item in enumerate(value)], single=False)


def one_text(item, where):
    """["text"] -> "text"; refuse a pair ["a", "b"], or anything else, naming it."""
    if not isinstance(item, list) or not all(isinstance(part, str) for part in item):
        raise bad_inputs(f"{where} must be a list of one string, such as [\"Great!\"]")
    if len(item) == 2:
        raise bad_inputs(f"{where} is a pair of texts, which TEI's API sends to cross-encoders; this model "
                         "classifies one text at a time, so pairs are refused. To classify two texts, send a "
                         'batch of one-string lists: {"inputs": [["first text"], ["second text"]]}')
    if len(item) != 1:
        raise bad_inputs(f"{where} holds {len(item)} strings; TEI's API takes one string per input. "
                         'A batch is a list of one-string lists: {"inputs": [["first"], ["second"], ["third"]]}')
    return item[0]


def tei_inputs_schema(limits):
    """What parse_tei_inputs accepts, as JSON schema: TEI's PredictInput without its pair forms."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_chars}
    one = {"type": "array", "items": text, "minItems": 1, "maxItems": 1}
    return {"oneOf": [text | {"description": "one text"}, one | {"description": "one text, in a list"},
                      {"type": "array", "items": one, "minItems": 1, "maxItems": limits.max_inputs,
                       "description": f"a batch (at most {limits.max_inputs}), answered in order"}],
            "description": "TEI's `inputs`: a text, or a batch of one-text lists. Pairs of texts are refused (422)."}


def tei_request(limits):
    """TEI's PredictRequest (router/src/http/types.rs) as a pydantic model, with this server's limits."""

    class TeiRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"inputs": "A wonderful, moving film."},
            {"inputs": [["Great!"], ["Dull."]], "raw_scores": True}]})
        inputs: Annotated[Any, PlainValidator(parse_tei_inputs), WithJsonSchema(tei_inputs_schema(limits))]
        truncate: Optional[StrictBool] = Field(
            None, description="cut texts longer than the model's maximum (null: yes, TEI's --auto-truncate); "
                              "false: refuse them (422)")
        truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
            "Right", description="Right keeps a long text's beginning, Left its end")
        raw_scores: StrictBool = Field(False, description="the logits instead of the softmax probabilities")

    return TeiRequest


def tei_task(body):
    return Task("tei", body.inputs.texts, body.inputs.single,
                name=(lambda i: "inputs") if body.inputs.single else (lambda i: f"inputs[{i}]"),
                truncate=body.truncate is not False, side=body.truncation_direction.lower(),
                raw_scores=body.raw_scores)


def check_inputs(task, limits):
    """TEI's checks and words (router/src/http/server.rs, core/src/tokenization.rs), with our limits:
    too many inputs 422, an empty text 400 "Empty". A blank text is a text in TEI: it is classified."""
    if len(task.texts) > limits.max_inputs:
        raise InputError(422, f"batch size {len(task.texts)} > maximum allowed batch size {limits.max_inputs}")
    for i, text in enumerate(task.texts):
        if text == "":
            raise InputError(400, f"Input validation error: `inputs` cannot be empty ({task.name(i)} is \"\")",
                             error_type=ErrorType.Empty.value)
        if len(text) > limits.max_chars:
            raise InputError(422, f"Input validation error: `inputs` must have at most {limits.max_chars} "
                                  f"characters. Given: {len(text)} ({task.name(i)})")
        if not is_encodable(text):
            raise InputError(422, f"{task.name(i)} is not valid Unicode: it holds an unpaired surrogate (\\ud800-\\udfff).")


class TeiPrediction(BaseModel):
    score: float = Field(description="probability (the logit with raw_scores)")
    label: str


def tei_scores(logits, raw):
    """TEI's scores (core/src/infer.rs): the logits, or the softmax (the sigmoid for a single logit)."""
    if raw:
        return logits
    return softmax(logits) if len(logits) > 1 else sigmoid(logits)


def tei_answer(rows, labels, task):
    """Per input, every label with its score, highest first: a flat list for one input, else one list each."""
    answers = [ranked(tei_scores(logits, task.raw_scores), labels) for logits in rows]
    return answers[0] if task.single else answers


def ranked(scores, labels):
    # TEI sorts ascending, then reverses: equal scores come out in reverse label order, as there.
    order = sorted(range(len(scores)), key=scores.__getitem__)[::-1]
    return [{"score": scores[i], "label": labels[i]} for i in order]


# -----------------------------------------------------------------------------
# the Hub's POST / (the Inference API, as huggingface_hub.InferenceClient calls it)


def parse_hub_inputs(value):
    """The Hub's `inputs`: a string; a list of strings is a batch, as for pipeline()."""
    if isinstance(value, str):
        return Inputs([value], single=True)
    if isinstance(value, list) and value and all(isinstance(text, str) for text in value):
        return Inputs(value, single=False)
    raise bad_inputs('inputs must be a string, or a non-empty list of strings: {"inputs": "A wonderful film."}')


def hub_inputs_schema(limits):
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_chars}
    return {"oneOf": [text | {"description": "one text"},
                      {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_inputs,
                       "description": f"several texts (at most {limits.max_inputs}), answered in order"}]}


class HubParameters(BaseModel):
    """TextClassificationParameters of the Hub's task specification."""

    model_config = ConfigDict(extra="forbid")
    top_k: Optional[Annotated[StrictInt, Field(ge=1)]] = Field(None, description="only the k most probable labels")
    function_to_apply: Optional[Literal["sigmoid", "softmax", "none"]] = Field(
        None, description="how logits become scores; default as pipeline(): softmax, sigmoid for one label")


def hub_request(limits):
    """TextClassificationInput of the Hub's task specification, with this server's limits."""

    class HubRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"inputs": "A wonderful, moving film.", "parameters": {"top_k": 1}}]})
        inputs: Annotated[Any, PlainValidator(parse_hub_inputs), WithJsonSchema(hub_inputs_schema(limits))]
        parameters: Optional[HubParameters] = None

    return HubRequest


def hub_task(body):
    parameters = body.parameters or HubParameters()
    return Task("hub", body.inputs.texts, body.inputs.single,
                name=(lambda i: "inputs") if body.inputs.single else (lambda i: f"inputs[{i}]"),
                function=parameters.function_to_apply, top_k=parameters.top_k)


class HubPrediction(BaseModel):
    label: str
    score: float


def default_function(config):
    """pipeline("text-classification")'s choice: sigmoid for one label or multi-label, else softmax."""
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def hub_answer(rows, labels, task, config):
    """One list per input, the k best labels first (stable for ties, as pipeline() sorts)."""
    apply = {"softmax": softmax, "sigmoid": sigmoid, "none": list}[task.function or default_function(config)]
    answers = []
    for logits in rows:
        scores = apply(logits)
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[: task.top_k]
        answers.append([{"label": labels[i], "score": scores[i]} for i in order])
    return answers


# -----------------------------------------------------------------------------
# TEI's timing headers (router/src/lib.rs, ResponseMetadata): integer milliseconds, floored


def timing_headers(device_type, characters, tokens, total_s, tokenization_s, queue_s, inference_s):
    """For a batch, TEI's tokenization, queue and inference times are means over its inputs."""
    ms = lambda seconds: str(int(seconds * 1000))  # noqa: E731 (Rust's as_millis(): floored)
    return {
        "x-compute-type": "cpu" if device_type == "cpu" else "gpu",  # TEI always says "gpu+optimized"
        "x-compute-time": ms(total_s),
        "x-compute-characters": str(characters),
        "x-compute-tokens": str(tokens),
        "x-total-time": ms(total_s),
        "x-tokenization-time": ms(tokenization_s),
        "x-queue-time": ms(queue_s),
        "x-inference-time": ms(inference_s),
    }
