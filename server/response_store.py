"""The in-memory store behind `store: true`, `previous_response_id` and GET /v1/responses/{id}.

Bounded both in entries and in characters: the oldest (least recently read) responses go first,
so a long-running server keeps the recent conversations and a bounded amount of memory.
Thread-safe: responses are stored from the worker threads that render them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

MAX_STORED_RESPONSES = 1024
MAX_STORED_CHARS = 32 << 20  # ~ the text of the stored responses and their conversations


@dataclass(frozen=True)
class StoredResponse:
    """A finished response: its JSON (for GET) and the conversation a follow-up continues
    (the earlier turns and its input, then its output as the assistant's message; not its
    instructions, which OpenAI does not carry over)."""

    body: str
    messages: tuple[dict[str, str], ...]

    @property
    def chars(self) -> int:
        return len(self.body) + sum(len(m["content"]) for m in self.messages)


class ResponseStore:
    """LRU of StoredResponse by response id."""

    def __init__(
        self, max_entries: int = MAX_STORED_RESPONSES, max_chars: int = MAX_STORED_CHARS
    ) -> None:
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        """Keeps `stored`, dropping the least recently used ones beyond the bounds (a single
        response larger than the whole budget is not kept)."""
        with self._lock:
            old = self._entries.pop(response_id, None)
            self._chars -= old.chars if old is not None else 0
            self._entries[response_id] = stored
            self._chars += stored.chars
            while self._entries and (
                len(self._entries) > self._max_entries or self._chars > self._max_chars
            ):
                _, dropped = self._entries.popitem(last=False)
                self._chars -= dropped.chars

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            stored = self._entries.get(response_id)
            if stored is not None:
                self._entries.move_to_end(response_id)
            return stored

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
