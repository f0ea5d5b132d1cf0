"""Streaming detokenization that never emits a broken UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from gemma_serve.model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns token ids into text as they are generated, one request at a time.

    Works on each token's raw bytes with an incremental UTF-8 decoder: bytes of a character that
    spans several byte-fallback tokens are held back until the character is complete, so no
    partial sequence or premature U+FFFD is emitted. Each add() costs O(new tokens). Because it
    uses the same bytes and the same codec (errors="replace") as Tokenizer.decode, the outputs of
    all add() calls plus flush() equal tokenizer.decode(all_ids) exactly, however ids are split.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        """Detokenize with `tokenizer`; special tokens are dropped if `skip_special_tokens`."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far by add() and flush()."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]  # joined once, then reused
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed newly generated ids; return the text they complete (may be "")."""
        tokenizer = self._tokenizer
        data = bytearray()
        for token_id in token_ids:
            if not (self._skip_special_tokens and tokenizer.is_special(token_id)):
                data += tokenizer.token_bytes(token_id)
        return self._emit(self._decoder.decode(bytes(data)))

    def flush(self) -> str:
        """End of generation: return held-back bytes of an unfinished character as U+FFFD."""
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, new_text: str) -> str:
        if new_text:
            self._chunks.append(new_text)
        return new_text
