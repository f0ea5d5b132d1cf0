"""Tool-call events as OpenAI chat output: streamed deltas and whole messages (torch-free).

One parser per choice (tool_parser.py); a streamed choice and a whole one go through the same
parser, so they carry the same content and calls. A choice that made calls and stopped on its
own finishes with "tool_calls"; one cut short keeps "length".
"""

from __future__ import annotations

from collections.abc import Sequence

from gemma_serve.server.engine.outputs import FINISH_STOP
from gemma_serve.server.protocol import ChatDelta, ChatMessageOut
from gemma_serve.server.tool_parser import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    FencedCallParser,
    JsonCallParser,
    make_parser,
)
from gemma_serve.server.tool_protocol import (
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
)
from gemma_serve.server.tools import ToolPlan

FINISH_TOOL_CALLS = "tool_calls"


class ChoiceTools:
    """The tool-call side of one chat response: a parser per streamed choice."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._parsers: dict[int, FencedCallParser | JsonCallParser] = {}

    @property
    def calls_only(self) -> bool:
        """The grammar allows nothing but calls ("required" or named)."""
        return self._plan.constrained

    def delta(self, index: int, text: str, finished: bool) -> ChatDelta | None:
        """The next streamed delta of choice `index`; None when there is nothing to send."""
        parser = self._parsers.setdefault(index, make_parser(self._plan))
        events = parser.feed(text) + (parser.finish() if finished else [])
        return stream_delta(events)

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        parser = self._parsers.get(index)
        return _finish(reason, parser.calls if parser else 0)

    def message(self, text: str, reason: str | None) -> tuple[ChatMessageOut, str | None]:
        """A whole choice: its message and finish reason."""
        parser = make_parser(self._plan)
        events = parser.feed(text) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        calls: list[ToolCallOut] = []
        for e in events:
            if isinstance(e, CallStart):
                calls.append(
                    ToolCallOut(id=e.id, function=FunctionCallOut(name=e.name, arguments=""))
                )
            elif isinstance(e, ArgumentsDelta):
                calls[e.index].function.arguments += e.text
        message = ChatMessageOut(
            content=content if content or not calls else None, tool_calls=calls or None
        )
        return message, _finish(reason, parser.calls)


def stream_delta(events: Sequence[Event]) -> ChatDelta | None:
    """Events merged into one delta: content joined, a call's start and argument pieces
    under its index."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, ToolCallDelta] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = ToolCallDelta(
                index=e.index,
                id=e.id,
                type="function",
                function=FunctionCallDelta(name=e.name, arguments=""),
            )
        elif isinstance(e, ArgumentsDelta):
            entry = calls.setdefault(
                e.index, ToolCallDelta(index=e.index, function=FunctionCallDelta(arguments=""))
            )
            entry.function.arguments = (entry.function.arguments or "") + e.text
    if not content and not calls:
        return None
    return ChatDelta(content=content or None, tool_calls=list(calls.values()) or None)


def _finish(reason: str | None, calls: int) -> str | None:
    return FINISH_TOOL_CALLS if calls and reason == FINISH_STOP else reason
