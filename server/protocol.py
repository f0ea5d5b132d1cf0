"""OpenAI request and response schemas for /v1/completions and /v1/chat/completions.

Requests are validated strictly from the raw JSON body (`parse_request`): a string where a number
belongs is an error, as in OpenAI's API, rather than silently coerced. Unknown fields are
ignored because OpenAI clients send extras. `None` means "use the default" for every optional
field, since clients send explicit nulls. Responses mirror OpenAI's shapes field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from gemma_serve.server.fields import Content, LogitBias, Prompt, Stop, is_int
from gemma_serve.server.limits import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
)
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class SamplingRequest(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None  # None: the served model (vLLM's leniency)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: Unit | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: Stop = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY
    )
    logit_bias: LogitBias = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(None, ge=0)  # 0: nothing generated (echo to score a prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) request, each a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str) or is_int(p[0]):
            return [p]
        return list(p)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: Content = None  # may be left out only by the assistant (OpenAI's rule)

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role not in ("assistant", "model"):
            raise PydanticCustomError(
                "missing", "a {role} message needs content", {"role": self.role}
            )
        return self


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape); `messages` applies the chat template instead."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validates a raw JSON body; raises pydantic.ValidationError (mapped to HTTP 400)."""
    return model.model_validate_json(body)


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Both the full response and a streamed chunk (same object name, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _delta_without_nulls(self, delta: ChatDelta) -> dict[str, Any]:
        # OpenAI sends {"content": "..."} or {} (on the finishing chunk), never null fields.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
