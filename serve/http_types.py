"""The HTTP API's types: what each route accepts and answers (the shapes /openapi.json documents),
and how every error becomes TEI's JSON body {"error": ..., "error_type": ...} with its status.

The routes (serve/app.py) read as "validate, queue, answer"; the shapes and the error mapping are
here, as Text Embeddings Inference keeps them in its router/src/http/types.rs.
"""

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag

from serve.ecosystem import ErrorType, Task, TeiPrediction, error_type_for, tei_request, tei_task


# -----------------------------------------------------------------------------
# request and response shapes


def predict_request(limits):
    """The /predict body as a type: {"text": ...}, {"texts": [...]} or TEI's {"inputs": ...}, exactly
    one of the three (`oneOf` in /openapi.json, so that the schema says exactly what the app accepts).

    The limits appear in the schema (maxLength, maxItems, a non-blank pattern), but check_texts
    enforces them, as for the command line: sizes answer 413, as in TEI, where pydantic would say 422.
    (TEI's own body follows TEI's checks: serve/ecosystem.py.)
    """
    review = Annotated[StrictStr, Field(json_schema_extra={"maxLength": limits.max_chars, "pattern": r"\S"})]

    class OneText(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "A wonderful, moving film."}]})
        text: review = Field(description="one review")

    class ManyTexts(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["Great!", "Dull."]}]})
        texts: list[review] = Field(description=f"several reviews (at most {limits.max_inputs}), answered in order",
                                    json_schema_extra={"minItems": 1, "maxItems": limits.max_inputs})

    one_of = (Annotated[OneText, Tag("text")] | Annotated[ManyTexts, Tag("texts")]
              | Annotated[tei_request(limits), Tag("inputs")])
    return Annotated[one_of, Discriminator(input_field, custom_error_type="one_of",
                                           custom_error_message='send exactly one of "text", "texts" or "inputs"')]


SHAPES = ("text", "texts", "inputs")


def input_field(body):
    """Which shape a body has: "text", "texts" or "inputs" when it holds exactly one of them (null
    counts as absent), else None, and pydantic reports a "one_of" error."""
    if not isinstance(body, dict):
        return None
    present = [name for name in SHAPES if body.get(name) is not None]
    return present[0] if len(present) == 1 else None


def our_task(body):
    if hasattr(body, "inputs"):
        return tei_task(body)
    if hasattr(body, "texts"):
        return Task("ours", body.texts, single=False)
    return Task("ours", [body.text], single=True, name=lambda i: "text")


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    score: float = Field(description="its probability")
    scores: dict[str, float] = Field(description="probability of every class, in the model's label order")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per input text, in input order")


# What /predict answers: ours for {"text"} and {"texts"}; TEI's for {"inputs"}, a flat list for one input.
PREDICT_ANSWERS = PredictResponse | list[TeiPrediction] | list[list[TeiPrediction]]


def explain_request(limits):
    """The /explain body: one review, as {"text": ...} of /predict, and the end to cut when it is too long."""

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "A wonderful, moving film."}]})
        text: StrictStr = Field(description="one review", json_schema_extra={"maxLength": limits.max_chars,
                                                                             "pattern": r"\S"})
        truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
            "Right", description="over the model's maximum, Right explains a review's beginning, Left its end "
                                 "(spelt as in TEI's body of /predict)")

    return ExplainRequest


class ExplainedWord(BaseModel):
    text: str = Field(description="the word: the review's characters start to end")
    start: int = Field(description="offset of its first character in the review, in Unicode code points")
    end: int = Field(description="offset just after its last character")
    attributions: dict[str, float] = Field(
        description="per class, the word's share of the change in that class's probability from the baseline "
                    "(the review with every word replaced by [PAD]) to the review; a word's scores add up to 0")


class ExplainResponse(BaseModel):
    prediction: Prediction = Field(description="the explained model copy's prediction for the review")
    words: list[ExplainedWord] = Field(description="the words the model saw, in text order (whitespace-separated)")
    truncated: bool = Field(description="the review was over max_length tokens: only the words listed were seen")
    num_tokens: int = Field(description="tokens explained, [CLS] and [SEP] included")
    max_length: int = Field(description="the model's maximum, in tokens")
    n_steps: int = Field(description="Integrated Gradients' points along the path (--explain_n_steps)")
    deltas: dict[str, float] = Field(
        description="per class, the convergence delta: the sum of the words' scores minus "
                    "(scores - baseline_scores), the error of the integral")
    baseline_scores: dict[str, float] = Field(description="probability of every class for the all-[PAD] baseline")
    seconds: float = Field(description="how long the explanation took, in the explainer's thread")


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, in one paragraph")
    error_type: ErrorType = Field(description="the class of problem, in Text Embeddings Inference's words")


# Every status a route answers besides 200, documented in /openapi.json.
WHEN = {
    400: "the body is not UTF-8; in TEI's and the Hub's API, a text is empty (error_type Empty)",
    413: "the body, a text or the number of texts is over its limit (in TEI's and the Hub's API, only the body)",
    422: "the body is not one of the accepted shapes, a text is blank or not valid Unicode; in TEI's and the "
         "Hub's API also too many texts, or a text over the model's maximum with truncate false",
    429: "too many texts are waiting for the model; retry after Retry-After seconds",
    503: "the model is still loading",
}
EXPLAIN_WHEN = WHEN | {
    400: "the body is not UTF-8",
    413: "the body or the text is over its limit",
    422: "the body is not {\"text\": ...} (with an optional truncation_direction), or the text is blank or not "
         "valid Unicode",
    429: "--max_concurrent_explains explanations are running or waiting already; retry after Retry-After seconds",
    503: "the model is still loading, or the server is stopping",
}
RETRY_AFTER = {"retry-after": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}


def documented(*codes, when=WHEN):
    responses = {code: {"model": ErrorResponse, "description": when[code]} for code in codes}
    if 429 in responses:
        responses[429]["headers"] = RETRY_AFTER
    return responses


# -----------------------------------------------------------------------------
# errors: always JSON {"error": "...", "error_type": "..."}, never a stack trace


def error(status, message, headers=None, error_type=None):
    """The error body of every route: TEI's ErrorResponse, whatever style the request had."""
    return JSONResponse({"error": message, "error_type": error_type or error_type_for(status)}, status_code=status,
                        headers=headers)


# What each body shape takes, for the message about an unknown field.
FIELDS = {
    "text": "send 'text' or 'texts'",
    "texts": "send 'text' or 'texts'",
    "inputs": "TEI's API takes 'inputs', 'truncate', 'truncation_direction' and 'raw_scores'",
    "hub": "POST / takes 'inputs' and 'parameters'",
    "parameters": "'parameters' takes 'top_k' and 'function_to_apply'",
    "explain": "POST /explain takes 'text' and 'truncation_direction'",
}
EXAMPLES = {"/predict": '{"text": "..."}', "/": '{"inputs": "..."}', "/explain": '{"text": "..."}'}
BODY_OF = {"/": "hub", "/explain": "explain"}  # the FIELDS entry of a route whose body has one shape


def describe_validation_errors(errors, path="/predict"):
    """FastAPI's error list -> one readable sentence per problem, e.g. "texts[1]: Input should be a valid string".
    On /predict the second part of each location is the body's shape ("text", "texts", "inputs")."""
    parts = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())][1:]  # drop "body"
        shape = loc.pop(0) if path == "/predict" and loc else BODY_OF.get(path, "hub")
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
        elif err.get("type") == "one_of":
            parts.append(describe_wrong_shape(err.get("input")))
        elif err.get("type") == "inputs":  # serve/ecosystem.py's own sentence
            parts.append(err.get("msg"))
        elif not loc:  # no body at all, or a form
            parts.append(f"the body must be a JSON object such as {EXAMPLES.get(path, '{}')}, sent as application/json")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc[-1]!r}: {FIELDS['parameters' if loc[0] == 'parameters' else shape]}")
        else:
            where = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc).lstrip(".") or "body"
            parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) + "."


def describe_wrong_shape(body):
    """A body that is none of {"text": ...}, {"texts": [...]} and {"inputs": ...}."""
    if not isinstance(body, dict):  # a list, a string, a number
        return 'the body must be a JSON object such as {"text": "..."}, sent as application/json'
    unknown = sorted(set(body) - set(SHAPES))
    if unknown and all(body.get(name) is None for name in SHAPES):
        return f"unknown field {unknown[0]!r}: send 'text' or 'texts' (or TEI's 'inputs')"
    return ('send exactly one of "text" (a string), "texts" (a list of strings) or "inputs" (Text Embeddings '
            'Inference\'s API)')


async def validation_error(request, exc):
    return error(422, describe_validation_errors(exc.errors(), request.url.path))


async def http_error(request, exc):
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names the methods of one route; GET / and POST / are two
        headers = {name: value for name, value in (headers or {}).items() if name.lower() != "allow"}
        headers["allow"] = ", ".join(allowed_methods(request.app, request.url.path))
    return error(exc.status_code, str(exc.detail), headers)


def allowed_methods(app, path):
    """Every method some route of `app` answers at `path`, sorted: the 405's Allow header."""
    return sorted({method for route in app.routes if getattr(route, "methods", None) and route.path_regex.match(path)
                   for method in route.methods})


async def unexpected_error(request, exc):
    """A genuine bug: the caller learns nothing about the internals; Starlette re-raises the
    exception after this response, so uvicorn logs the traceback on the server."""
    return error(500, "internal server error; the details are in the server's log.")
