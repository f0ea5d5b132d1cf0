"""Tool calls read out of generated text, incrementally (torch-free).

A parser is fed the text deltas of one choice and returns events: content, the start of a
call (index, id, name) and fragments of its arguments. Streaming sends them as they come; a
whole response feeds the whole text, so both see exactly the same calls and content.

- `FencedCallParser` (tool_choice "auto"): ```tool_call blocks holding
  {"name": ..., "arguments": {...}} (or "parameters") for an offered function are calls; the
  rest, and any block that is not such a call, is content. A block is held back until it
  closes (it may still turn out to be text), then sent as one name and one arguments event.
  Whitespace next to a call is dropped. With parallel_tool_calls false only the first call is
  kept (later call blocks are dropped, as vLLM does).
- `JsonCallParser` ("required", named): the grammar forces bare JSON, one call object or an
  array of them, keys in schema order; arguments are sent as they are generated.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from gemma_serve.server.tool_prompt import CALL_FENCE, FENCE_END
from gemma_serve.server.tools import ToolPlan


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def make_parser(plan: ToolPlan) -> FencedCallParser | JsonCallParser:
    if plan.constrained:
        return JsonCallParser(plan.names)
    return FencedCallParser(plan.names, plan.parallel)


class FencedCallParser:
    """tool_choice "auto": calls in ```tool_call blocks, everything else content."""

    def __init__(self, names: Iterable[str], parallel: bool = True) -> None:
        self._names = frozenset(names)
        self._parallel = parallel
        self._pending = ""  # text not yet sent: a (possible) block, or held whitespace
        self._in_block = False
        self._held_space = ""  # trailing whitespace of the content so far
        self._after_call = False  # the last thing seen was a call: drop leading whitespace
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        events: list[Event] = []
        while True:
            if not self._in_block:
                start = self._pending.find(CALL_FENCE)
                if start < 0:
                    keep = _partial_suffix(self._pending, CALL_FENCE)
                    cut = len(self._pending) - keep
                    events += self._content(self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return events
                events += self._content(self._pending[:start])
                self._pending = self._pending[start:]
                self._in_block = True
            end = self._pending.find(FENCE_END, len(CALL_FENCE))
            if end < 0:
                return events
            block = self._pending[: end + len(FENCE_END)]
            self._pending = self._pending[end + len(FENCE_END) :]
            self._in_block = False
            events += self._block(block)

    def finish(self) -> list[Event]:
        """The text still held back (an unclosed block is content)."""
        events = self._content(self._pending)
        self._pending, self._in_block = "", False
        if not self.calls and self._held_space:
            events.append(ContentDelta(self._held_space))
        self._held_space = ""
        return events

    def _block(self, block: str) -> list[Event]:
        call = _parse_call(block[len(CALL_FENCE) : -len(FENCE_END)], self._names)
        if call is None:
            return self._content(block)
        self._held_space, self._after_call = "", True
        if self.calls and not self._parallel:
            return []
        index, self.calls = self.calls, self.calls + 1
        name, arguments = call
        return [CallStart(index, new_call_id(), name), ArgumentsDelta(index, arguments)]

    def _content(self, text: str) -> list[Event]:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return []
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._held_space += text
            return []
        out, self._held_space = self._held_space + body, text[len(body) :]
        return [ContentDelta(out)]


def _parse_call(body: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a block's body, or None when it is not a call."""
    try:  # usually on the line after the fence; on the fence line is read as well
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict):
        return None
    name = call.get("name")
    arguments = call.get("arguments", call.get("parameters"))
    if name not in names or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that starts `marker` (may still become it)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class JsonCallParser:
    """ "required" / named: bare JSON the grammar wrote, {"name": N, "arguments": A} objects
    (alone or in an array), with ", " and ": " separators. Arguments stream as generated."""

    def __init__(self, names: Iterable[str]) -> None:
        self._headers = {n: f'{{"name": {json.dumps(n)}, "arguments": ' for n in names}
        self._state = "seek"  # seek -> header -> arguments -> tail -> seek; or text
        self._buffer = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        fragment: list[str] = []
        for i, ch in enumerate(text):
            if self._state == "text":  # not the expected shape (never, under the grammar)
                events += _flush_args(self.calls - 1, fragment) + [ContentDelta(text[i:])]
                return events
            if self._state == "arguments":
                fragment.append(ch)
                if self._scan(ch):
                    events += _flush_args(self.calls - 1, fragment)
                    self._state = "tail"
            elif self._state == "seek":
                if ch == "{":
                    self._state, self._buffer = "header", ch
                elif ch not in "[], \n\t":
                    self._state = "text"
                    events.append(ContentDelta(ch))
            elif self._state == "header":
                events += self._header(ch)
            elif ch == "}":  # tail: the call object closes
                self._state = "seek"
        return events + _flush_args(self.calls - 1, fragment)

    def finish(self) -> list[Event]:
        """A call cut short (max_tokens) keeps what was sent; nothing is held back."""
        return []

    def _header(self, ch: str) -> list[Event]:
        self._buffer += ch
        for name, header in self._headers.items():
            if self._buffer == header:
                self.calls += 1
                self._state, self._depth = "arguments", 0
                return [CallStart(self.calls - 1, new_call_id(), name)]
        if any(h.startswith(self._buffer) for h in self._headers.values()):
            return []
        self._state = "text"
        return [ContentDelta(self._buffer)]

    def _scan(self, ch: str) -> bool:
        """Advances over one character of the arguments; True when the value has ended."""
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            return self._depth == 0
        return False


def _flush_args(index: int, fragment: list[str]) -> list[Event]:
    if not fragment:
        return []
    text = "".join(fragment)
    fragment.clear()
    return [ArgumentsDelta(index, text)]
