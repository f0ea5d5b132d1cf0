"""OpenAI request and response schemas for /v1/completions and /v1/chat/completions.

Requests are validated strictly from the raw JSON body (`parse_request`): a string where a number
belongs is an error, as in OpenAI's API, rather than silently coerced. Unknown top-level fields
are ignored with a warning naming them, as vLLM does, because OpenAI clients send extras.
`None` means "use the default" for every optional field, since clients send explicit nulls.
Responses mirror OpenAI's shapes field for field.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, TypeVar

from gemma_serve.server.fields import Content, LogitBias, Prompt, Stop, is_int
from gemma_serve.server.limits import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP_TOKEN_IDS,
    MIN_REPETITION_PENALTY,
)
from gemma_serve.server.structured_request import StructuredOutputFields
from gemma_serve.server.tool_protocol import (
    AssistantToolCall,
    ToolCallDelta,
    ToolCallOut,
    ToolFields,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


# ---- vLLM's request extras (kept together: vLLM clients send them, each one has its effect) --


class VllmExtras(_Strict):
    """vLLM's extras that both endpoints honour; None takes vLLM's default (which
    add_special_tokens has per endpoint: true for completions, false for chat)."""

    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=MAX_STOP_TOKEN_IDS
    )
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # Accepted; no effect on Gemma's byte-level detokenization (as in vLLM v1 with a fast
    # tokenizer): special tokens are never joined by spaces.
    spaces_between_special_tokens: bool | None = None
    add_special_tokens: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # -1: max_model_len; keeps the end
    priority: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # lower is served first


class VllmTemplateExtras(_Strict):
    """vLLM's chat-template options (chat completions and /tokenize with messages)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # Gemma's template reads add_generation_prompt and continue_final_message (these win over
    # the fields, as in vLLM); other keys are variables it does not use.
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _template_flags_are_bools(self) -> VllmTemplateExtras:
        kwargs = self.chat_template_kwargs or {}
        for name in ("add_generation_prompt", "continue_final_message"):
            if not isinstance(kwargs.get(name, False), bool):
                raise PydanticCustomError(
                    "bool_type", "chat_template_kwargs.{name} must be a boolean", {"name": name}
                )
        return self

    def template_flags(self) -> tuple[bool, bool]:
        """(add_generation_prompt, continue_final_message) after chat_template_kwargs."""
        kwargs = self.chat_template_kwargs or {}
        gen = kwargs.get("add_generation_prompt", self.add_generation_prompt)
        cont = kwargs.get("continue_final_message", self.continue_final_message)
        return (True if gen is None else gen), bool(cont)


# ---- the OpenAI requests ---------------------------------------------------------------------


class SamplingRequest(StructuredOutputFields, VllmExtras):
    """Fields shared by both endpoints."""

    # Unknown fields are kept aside (model_extra) so that parse_request can name them.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

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
    # Chat-only fields, named here so that they are refused (400) rather than ignored.
    tools: Any = None
    tool_choice: Any = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) request, each a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str) or is_int(p[0]):
            return [p]
        return list(p)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "model", "tool"]
    content: Content = None  # may be left out only by the assistant (OpenAI's rule)
    tool_calls: list[AssistantToolCall] | None = None  # the assistant's calls
    tool_call_id: str | None = None  # which call a tool message answers

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        assistant = self.role in ("assistant", "model")
        if self.content is None and not assistant:
            raise PydanticCustomError(
                "missing", "a {role} message needs content", {"role": self.role}
            )
        if self.tool_calls is not None and not assistant:
            raise PydanticCustomError("extra_forbidden", "only assistant messages make tool calls")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise PydanticCustomError(
                "invalid_value", "tool_call_id belongs to (and is required by) tool messages"
            )
        return self


class ChatCompletionRequest(ToolFields, SamplingRequest, VllmTemplateExtras):
    """POST /v1/chat/completions."""

    echo: bool | None = None  # vLLM: the reply starts with the last message if assistant's
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(VllmTemplateExtras):
    """POST /tokenize (vLLM's shape); `messages` applies the chat template instead. As on
    the generation endpoints, add_special_tokens defaults to true for a prompt (BOS first)
    and false for messages (the template has its BOS)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


RequestT = TypeVar("RequestT", bound=BaseModel)
MAX_NAMED_EXTRAS = 10  # a body of a thousand made-up fields logs one short line


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validates a raw JSON body; raises pydantic.ValidationError (mapped to HTTP 400). Fields
    outside the API are ignored with a warning (vLLM's behaviour)."""
    req = model.model_validate_json(body)
    if req.model_extra:
        names = sorted(req.model_extra)
        shown = ", ".join(names[:MAX_NAMED_EXTRAS]) + (
            ", ..." if len(names) > MAX_NAMED_EXTRAS else ""
        )
        logger.warning("%s: ignored fields not in the API: %s", model.__name__, shown)
        req.model_extra.clear()
    return req


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


class PromptLogprob(BaseModel):
    """vLLM's Logprob: rank is the token's place among the top alternatives (1 = best), null
    when it is not among them."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (the first null), the token and the top
# alternatives, keyed by token id.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extra


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
    content: str | None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: Any) -> dict[str, Any]:
        # Plain replies keep OpenAI's shape (no tool_calls key); content stays, null or not.
        out = handler(self)
        if self.tool_calls is None:
            out.pop("tool_calls", None)
        return out


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
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extra


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
