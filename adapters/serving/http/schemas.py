"""Request and response bodies of the HTTP API (OpenAI's completions and chat formats, plus classify).

Request bodies refuse what they do not know: an unknown parameter is a 400 naming it, and an OpenAI
parameter this server does not implement is declared with the only value it accepts (its no-op, e.g.
``presence_penalty`` 0), so the OpenAPI document states it and any other value is a 400 naming it
(``UNSUPPORTED`` holds the messages). An explicit ``null`` for an optional number means its default.

Types are strict, as OpenAI's API is: a boolean is never a number, a string never a number or a boolean
(``"temperature": true`` and ``"max_tokens": "2"`` are 400s); an integer is accepted where a float is expected.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from adapters.modeling.generation import SEED_RANGE
from adapters.serving.engine import BASE

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's limit for top_logprobs)

# Parameter -> what this server accepts for it; any other value is a 400 with this text.
UNSUPPORTED = {
    "presence_penalty": "only 0 or null is accepted",
    "frequency_penalty": "only 0 or null is accepted",
    "logit_bias": "only an empty object or null is accepted",
    "suffix": "only an empty string or null is accepted",
    "tools": "tool calling is not implemented; only an empty list or null is accepted",
    "tool_choice": "tool calling is not implemented; only 'none' or null is accepted",
    "response_format": "only {'type': 'text'} or null is accepted",
}


def _or(default: Any) -> AfterValidator:
    """An explicit null becomes ``default``."""
    return AfterValidator(lambda v: default if v is None else v)


_Model = Annotated[
    str, Field(min_length=1, pattern=r"\S", description='"base" or an adapter reference: name, name@3, name@prod.')
]
_Temperature = Annotated[
    Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None,
    _or(1.0),
    Field(description="0 = greedy (so is anything below 1e-5). null: 1."),
]
_TopP = Annotated[
    Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None,
    _or(1.0),
    Field(description="Nucleus sampling. null: 1."),
]
# lt, not le: the OpenAPI document holds bounds as floats, and 2**64 is exact in one (2**64 - 1 is not)
_Seed = Annotated[
    int | None,
    Field(
        ge=SEED_RANGE[0],
        lt=SEED_RANGE[1] + 1,
        description=("Makes sampling reproducible. Sample i of n uses (seed + i) mod 2**64."),
    ),
]
_Stop = Annotated[str | list[str] | None, Field(description="Stop strings (not included in the text).")]
_N = Annotated[
    Annotated[int, Field(ge=1)] | None,
    _or(1),
    Field(description="Independent samples per prompt (choices prompt 0 sample 0..n-1, then prompt 1...). null: 1."),
]
_NoPenalty = Annotated[
    float | None, Field(ge=0, le=0, allow_inf_nan=False, description="Not implemented: only 0 or null.")
]
_NoLogitBias = Annotated[dict[str, float] | None, Field(max_length=0, description="Not implemented: only {} or null.")]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
_Prompt = Annotated[
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    | _TokenIds
    | Annotated[list[_TokenIds], Field(min_length=1)],
    Field(
        description="A prompt, a list of prompts, a prompt as token ids or a list of them (one choice each). "
        "Token-id prompts are used as given: no prompt format, no special tokens added."
    ),
]


# An unknown parameter is refused (400 naming it), never ignored; no value is coerced into another type.
_STRICT = ConfigDict(extra="forbid", strict=True)


class _Body(BaseModel):
    model_config = _STRICT


class StreamOptions(BaseModel):
    """OpenAI's stream_options (only with ``stream``)."""

    model_config = _STRICT
    include_usage: bool | None = None


class CompletionBody(_Body):
    """POST /v1/completions: one prompt or a list of prompts, each answered by ``n`` choices."""

    model: _Model = BASE
    prompt: _Prompt
    max_tokens: Annotated[Annotated[int, Field(ge=0)] | None, _or(16)] = Field(
        16, description="New tokens to generate at most; 0 (with echo) scores the prompt only. null: 16."
    )
    temperature: _Temperature = 1.0
    top_p: _TopP = 1.0
    seed: _Seed = None
    stop: _Stop = None
    n: _N = 1
    best_of: int | None = Field(None, ge=1, description="Only equal to n (or null): no candidates are ranked.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description=(
            "Return each token's log-probability and the top `logprobs` alternatives (log-softmax of the logits at "
            "temperature 1 over the whole vocabulary)."
        ),
    )
    echo: Annotated[bool | None, _or(False)] = Field(
        False,
        description="Put the prompt (as the model saw it) before the completion; with logprobs, the prompt "
        "tokens' log-probabilities too (the first is null).",
    )
    stream: Annotated[bool | None, _or(False)] = Field(
        False,
        description=(
            "Send the choices as server-sent events (OpenAI's chunks), token by token; with logprobs, each chunk "
            "carries its tokens' (with echo, a choice is sent when it ends, the prompt's in its first chunk). "
            "null: false."
        ),
    )
    stream_options: StreamOptions | None = Field(None, description="Only with stream.")
    presence_penalty: _NoPenalty = None
    frequency_penalty: _NoPenalty = None
    logit_bias: _NoLogitBias = None
    suffix: str | None = Field(None, max_length=0, description="Not implemented: only '' or null.")
    user: str | None = Field(None, description="An end-user id (accepted; it does not change the output).")
    raw: bool = Field(False, description="Do not apply the adapter's training prompt format to the prompt.")
    ignore_eos: bool = Field(False, description="Generate max_tokens even past the end-of-sequence token (benchmarks).")


class TextPart(BaseModel):
    """One part of a message's content; only text parts are read."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn. ``developer`` is given to the chat template as ``system``; ``tool`` turns (tool results)
    and ``name`` / ``tool_call_id`` / ``tool_calls`` are given to the template as they are."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] = Field(..., description="Text, or a list of text parts (joined with newlines).")
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        # say which part is not text, rather than pydantic's list of union branches
        parts = data.get("content") if isinstance(data, dict) else None
        for i, part in enumerate(parts if isinstance(parts, list) else []):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported_content",
                    "content[{index}] is a '{kind}' part; this server reads only 'text' parts",
                    {"index": i, "kind": kind},
                )
        return data

    def text(self) -> str:
        """The content as one string (text parts joined with newlines)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as the chat template takes it: role (developer -> system), content as a string, and the
        optional fields that were given."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "tool_calls"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ResponseFormat(BaseModel):
    """OpenAI's response_format; only plain text is produced."""

    model_config = _STRICT
    type: Literal["text"]


class ChatBody(_Body):
    """POST /v1/chat/completions: a conversation, answered by ``n`` assistant messages."""

    model: _Model = BASE
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="null: max_completion_tokens, else 256.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens. null: 256.")
    temperature: _Temperature = 1.0
    top_p: _TopP = 1.0
    seed: _Seed = None
    stop: _Stop = None
    n: _N = 1
    logprobs: Annotated[bool | None, _or(False)] = Field(
        False,
        description=(
            "Return each token's log-probability (log-softmax of the logits at temperature 1 over the whole "
            "vocabulary) in choices[].logprobs.content."
        ),
    )
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (with logprobs).")
    stream: Annotated[bool | None, _or(False)] = Field(
        False,
        description=(
            "Send the choices as server-sent events (OpenAI's chunks), token by token; with logprobs, each chunk "
            "carries its tokens'. null: false."
        ),
    )
    stream_options: StreamOptions | None = Field(None, description="Only with stream.")
    presence_penalty: _NoPenalty = None
    frequency_penalty: _NoPenalty = None
    logit_bias: _NoLogitBias = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not implemented: only [] or null.")
    tool_choice: Literal["none"] | None = Field(None, description="Not implemented: only 'none' or null.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'} or null.")
    user: str | None = Field(None, description="An end-user id (accepted; it does not change the output).")


class ClassifyBody(_Body):
    """POST /v1/classify: one text or a list of texts for a sequence-classification adapter."""

    model: Annotated[str, Field(min_length=1, pattern=r"\S", description="The classification adapter's reference.")]
    input: str | Annotated[list[str], Field(min_length=1)] = Field(..., description="A text or a list of texts.")


class AdapterBody(BaseModel):
    """POST /v1/adapters/load and /unload: the adapter to load or unload."""

    model_config = _STRICT
    adapter: str = Field(
        ..., min_length=1, pattern=r"\S", description="Adapter reference: name, name@3, name@prod or a folder."
    )


# ------------------------------------------------------------------ responses
class Usage(BaseModel):
    """Token counts of one request: each prompt counted once (whatever n), completions summed over choices."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs of one choice, one entry per token (the prompt's first when echoed, then each
    generated token, a stop string's included): its text, log-probability (null for the first prompt token),
    most likely alternatives {text: log-probability} and character offset into the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One generated text of a completion; ``finish_reason`` is "stop" or "length"."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    """The answer to POST /v1/completions: n choices per prompt, in request order."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    """A token's text, its log-probability and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token (see TopLogprob) with the most likely alternatives at its position."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """The log-probabilities of a chat choice's tokens."""

    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    """The assistant's answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One assistant message of a chat completion."""

    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None = None


class ChatResponse(BaseModel):
    """The answer to POST /v1/chat/completions (n choices)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Classification(BaseModel):
    """One text's predicted label, its probability (``confidence``) and every label's probability."""

    index: int
    label: str
    confidence: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    """The answer to POST /v1/classify, one result per text in request order."""

    id: str
    object: Literal["classification"] = "classification"
    model: str
    results: list[Classification]
    usage: Usage


class ModelCard(BaseModel):
    """One servable model: "base" or an adapter version. ``created``: Unix seconds (an adapter's manifest
    created_at; the base: when this server loaded it). The other fields say what is known of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    resident: bool
    base: str | None = None
    task: str | None = None
    method: str | None = None
    mixable: bool | None = None
    labels: list[str] | None = None
    refs: list[str] | None = None
    uses: int | None = None
    tags: list[str] | None = None


class ModelList(BaseModel):
    """GET /v1/models: base, resident adapters, then stored versions for this task."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoaded(BaseModel):
    """POST /v1/adapters/load: the reference, its folder key, the load's seconds and how many are resident."""

    loaded: str
    key: str
    load_seconds: float
    resident: int


class AdapterUnloaded(BaseModel):
    """POST /v1/adapters/unload: whether it was resident (and is now freed) and how many remain."""

    unloaded: bool
    adapter: str
    resident: int


class Health(BaseModel):
    """GET /health: liveness and the server's load."""

    status: Literal["ok"]
    base: str
    task: str
    resident_adapters: int
    capacity: int
    queue_depth: int


class ErrorDetail(BaseModel):
    """What went wrong: a message, OpenAI's error ``type``, the parameter at fault and the HTTP status."""

    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: {"error": {...}}."""

    error: ErrorDetail


_STATUS = {
    400: "Invalid request (the message names the parameter).",
    401: "Missing or wrong bearer token.",
    404: "No such adapter, version or tag.",
    409: "The adapter was trained on another base model.",
    413: "Request body over the server's limit.",
    500: "Internal error (logged with its traceback).",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer the HTTP statuses ``codes`` with an ErrorResponse."""
    return {code: {"model": ErrorResponse, "description": _STATUS[code]} for code in codes}
