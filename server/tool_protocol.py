"""The tool-calling shapes of the OpenAI chat API: the request's tools and the history's tool
calls, and the calls of a reply (whole and streamed). Validation beyond their shapes, and what
they mean for generation, are tools.py's."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Lenient(BaseModel):
    # Clients add keys of their own (e.g. "strict"): ignored, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Lenient):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(_Lenient):
    """A call in the history (an assistant message's tool_calls)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolFields(BaseModel):
    """The chat request fields of tool calling."""

    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# ---- in replies


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a call: index, id, type and name first, then argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta
