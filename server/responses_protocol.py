"""The OpenAI Responses API's request and response shapes (POST /v1/responses), text only.

Torch-free. A request is validated strictly, and every field outside what this server does is
a 400 naming it (not ignored as on the chat endpoints: a Responses client that sends tools,
reasoning or background expects them to act). The response object and the streamed events
follow OpenAI's (and vLLM's) shapes; the openai SDK's own types parse them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from gemma_serve.server.errors import bad_request
from pydantic import BaseModel, ConfigDict, Field

MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits
TEXT_PARTS = ("input_text", "output_text")
INPUT_ROLES = ("user", "assistant", "system", "developer")


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Fields OpenAI defines but this server does not do are accepted only
    at their neutral values (no tools, text format, truncation disabled...)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = None
    store: bool | None = None  # None: true, as OpenAI
    previous_response_id: str | None = None
    metadata: dict[str, Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None = Field(
        None, max_length=MAX_METADATA_KEYS
    )
    user: str | None = None
    # Neutral values only (checked in `refuse_unsupported`)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[Any] | None = None
    background: Literal[False] | None = None
    reasoning: None = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field this server cannot honour."""
        if self.model_extra:
            name = sorted(self.model_extra)[0]
            raise bad_request(f"Unsupported field for /v1/responses: '{name}'", param=name)
        if self.tools:
            raise bad_request("tools are not supported on /v1/responses yet", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools, which are not supported", "tool_choice")
        if self.text not in (None, {}, {"format": {"type": "text"}}):
            raise bad_request("only text output is supported: text.format.type 'text'", "text")
        if self.include:
            raise bad_request("include is not supported", param="include")
        if any(len(key) > MAX_METADATA_KEY for key in self.metadata or {}):
            raise bad_request(
                f"metadata keys are at most {MAX_METADATA_KEY} characters", "metadata"
            )


def input_messages(given: str | list[dict[str, Any]]) -> list[dict[str, str]]:
    """The request's `input` as chat messages: a string is one user message; a list holds
    messages (`type` "message" or absent) whose content is a string or input_text /
    output_text parts (joined, as chat content parts are)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise bad_request("input must not be an empty list", param="input")
    return [_message(item, f"input[{i}]") for i, item in enumerate(given)]


def _message(item: dict[str, Any], where: str) -> dict[str, str]:
    kind = item.get("type", "message")
    if kind != "message":
        raise bad_request(f"{where}: input items of type {kind!r} are not supported", where)
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(INPUT_ROLES)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(f"{at}: only input_text and output_text parts are supported", at)
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}


# ---- the response object -------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache
    cache_write_tokens: int = 0  # no explicit prompt-cache writes (prompt_cache_key) here


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """OpenAI's Response, as far as a text-only server fills it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str] | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str
    tools: list[Any] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None
