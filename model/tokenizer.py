"""Gemma's SentencePiece tokenizer: safe encoding, byte-exact decoding and the chat template.

Torch-free. Two rules shape the design:
- Text a user sends never becomes a control id. Gemma's tokenizer.model may store markers such
  as "<start_of_turn>" as USER_DEFINED pieces, which SentencePiece matches inside raw text, so on
  load those pieces are re-typed to CONTROL in a private copy of the model used for encoding.
- Decoding works on each token's raw bytes (byte-fallback pieces are single bytes), joined and
  decoded as UTF-8 with U+FFFD for invalid bytes. The incremental detokenizer uses the same bytes
  and the same codec, so streaming and one-shot decoding agree exactly.
"""

from __future__ import annotations

import itertools
import re
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

_PieceType = sp_pb2.ModelProto.SentencePiece
# USER_DEFINED pieces that are markers, not text. Gemma's vocabulary also holds user-defined HTML
# tags ("<table>", "<h1>") and whitespace runs: ordinary text that the model writes.
_MARKER = re.compile(r"<(?:[a-z0-9]+_[a-z0-9_]+|unused\d+|mask|2mass)>|\[@BOS@\]|\[multimodal\]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CHAT_ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    """A Gemma SentencePiece tokenizer (byte fallback, no dummy prefix, identity normalization).

    Decoding follows Python's UTF-8 codec with errors="replace": an invalid or truncated byte
    sequence becomes one U+FFFD per maximal invalid subpart (SentencePiece itself writes one per
    byte). Unknown pieces render as their piece text ("<unk>"), not SentencePiece's " ⁇ ".
    """

    def __init__(self, model_proto: bytes) -> None:
        """Build from the serialized bytes of a SentencePiece ModelProto (a tokenizer.model)."""
        proto = sp_pb2.ModelProto()
        try:
            proto.ParseFromString(model_proto)
        except DecodeError as exc:
            raise ValueError(f"not a SentencePiece model: {exc}") from exc
        if not proto.pieces:
            raise ValueError("not a SentencePiece model: it has no pieces")
        if proto.normalizer_spec.add_dummy_prefix:
            # Gemma's model has it off; with it on, every encoded segment of the chat template
            # would gain a leading space and decode() would differ from SentencePiece's.
            raise ValueError("unsupported SentencePiece model: add_dummy_prefix must be false")

        ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        special: set[int] = set()
        pieces: list[bytes] = []
        for i, p in enumerate(proto.pieces):
            marker = p.type == _PieceType.USER_DEFINED and _MARKER.fullmatch(p.piece) is not None
            if p.type in (_PieceType.CONTROL, _PieceType.UNKNOWN) or marker:
                special.add(i)
            if marker:
                p.type = _PieceType.CONTROL  # only in the copy used for encoding
            pieces.append(_piece_bytes(p))
        # Every piece's bytes in one buffer, piece i at [_ends[i], _ends[i + 1]): a bytes object
        # per piece costs ~40 bytes of header for ~7 of text (12 MB on a 262,144-piece vocabulary).
        self._blob = b"".join(pieces)
        self._ends = array("L", itertools.accumulate(map(len, pieces), initial=0))
        del pieces
        self._special = frozenset(special)
        # The control pieces as written in a prompt ("<bos>", "<start_of_turn>"...), longest
        # first so that a marker is never cut short by a shorter one it starts with.
        self._control_ids = {proto.pieces[i].piece: i for i in special}
        names = sorted(self._control_ids, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, names)) or r"(?!)")

        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except RuntimeError as exc:
            raise ValueError(f"not a valid SentencePiece model: {exc}") from exc
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError("SentencePiece model must define both bos and eos pieces")
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int | None = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.start_of_turn_id: int | None = ids.get("<start_of_turn>")
        self.end_of_turn_id: int | None = ids.get("<end_of_turn>")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.model file (or a checkpoint directory that contains one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model (ids are 0 .. vocab_size - 1)."""
        return len(self._ends) - 1

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, BOS first if `add_bos`. Never yields a special id from the text."""
        ids: list[int] = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def encode_with_control(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of a prompt whose caller owns the whole text (a completions prompt,
        /tokenize): control-token strings such as "<start_of_turn>" become their ids, as HF
        tokenizers and vLLM do; the text between them is encoded as plain text."""
        ids = [self.bos_id] if add_bos else []
        start = 0
        for match in self._control_re.finditer(text):
            ids += self._sp.encode(text[start : match.start()]) if match.start() > start else []
            ids.append(self._control_ids[match.group()])
            start = match.end()
        return ids + (self._sp.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped, or rendered as their piece text."""
        data = bytearray()
        blob, ends = self._blob, self._ends
        for token_id in ids:
            self._check_id(token_id)
            if not (skip_special_tokens and token_id in self._special):
                data += blob[ends[token_id] : ends[token_id + 1]]
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token: <0xNN> -> that byte, "▁" -> b" ", a special -> its text."""
        self._check_id(token_id)
        return self._blob[self._ends[token_id] : self._ends[token_id + 1]]

    def token_text(self, token_id: int) -> str:
        r"""Display text of one token, for logprobs.

        Bytes that are not valid UTF-8 on their own (a lone byte-fallback token such as <0xE2>)
        are written as backslash escapes: "\\xe2" (a four-character string).
        """
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (bos, eos, pad, unk, turn markers...) that decode can skip."""
        self._check_id(token_id)
        return token_id in self._special

    def stop_token_ids(self, chat: bool) -> frozenset[int]:
        """Ids that end generation: eos, plus <end_of_turn> for chat requests."""
        if chat and self.end_of_turn_id is not None:
            return frozenset({self.eos_id, self.end_of_turn_id})
        return frozenset({self.eos_id})

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Token ids of a conversation in Gemma's chat format, BOS first.

        continue_final_message leaves the last (model) turn open, without its <end_of_turn>,
        so that generation continues it (HF's and vLLM's option of that name).

        Follows Gemma's official template: roles "user" and "assistant"/"model" must alternate,
        starting with the user; an optional leading "system" message is prepended to the first
        user turn followed by "\\n\\n"; each message's content is stripped of surrounding
        whitespace. Markers are inserted as ids, message text is encoded as plain text.
        Raises ValueError for an unknown role, roles that do not alternate, or non-string fields.
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError("this tokenizer has no <start_of_turn>/<end_of_turn> tokens")
        start, end = self.start_of_turn_id, self.end_of_turn_id
        newline = self.encode("\n", add_bos=False)
        turns = _gemma_turns(messages)
        if continue_final_message and (add_generation_prompt or turns[-1][0] != "model"):
            raise ValueError(
                "continue_final_message needs a final assistant message and "
                "add_generation_prompt false"
            )
        ids = [self.bos_id]
        for role, text in turns:
            # Role header and text form one segment, as when the rendered string is tokenized.
            ids += [start, *self.encode(f"{role}\n{text}", add_bos=False), end, *newline]
        if continue_final_message:
            del ids[-1 - len(newline) :]  # the open turn: no <end_of_turn>\n
        if add_generation_prompt:
            ids += [start, *self.encode("model\n", add_bos=False)]
        return ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")


def _piece_bytes(piece: sp_pb2.ModelProto.SentencePiece) -> bytes:
    """The bytes a piece stands for in decoded text."""
    if piece.type == _PieceType.BYTE:
        match = _BYTE_PIECE.fullmatch(piece.piece)
        if match is None:
            raise ValueError(f"malformed byte piece {piece.piece!r}")
        return bytes([int(match.group(1), 16)])
    return piece.piece.replace("\u2581", " ").encode("utf-8")


def _gemma_turns(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, text) per turn, with the system message folded into the first user turn."""
    if not messages:
        raise ValueError("messages must not be empty")
    prefix, first = "", 0
    if _field(messages, 0, "role") == "system":
        prefix, first = _field(messages, 0, "content") + "\n\n", 1
        if len(messages) == 1:
            raise ValueError("a system message must be followed by a user message")
    turns = []
    for index in range(first, len(messages)):
        given = _field(messages, index, "role")
        role = _CHAT_ROLES.get(given)
        if role is None:
            where = "only allowed as the first message" if given == "system" else "unknown"
            raise ValueError(
                f"messages[{index}]: role {given!r} is {where}; "
                "expected 'user' or 'assistant' (or 'model'), after an optional first 'system'"
            )
        if role != ("user" if (index - first) % 2 == 0 else "model"):
            raise ValueError(
                f"messages[{index}]: roles must alternate user/assistant starting with user "
                f"(after an optional system message), got {given!r}"
            )
        text = _field(messages, index, "content").strip()
        turns.append((role, prefix + text if index == first else text))
    return turns


def _field(messages: Sequence[Mapping[str, str]], index: int, key: str) -> str:
    value = messages[index].get(key)
    if not isinstance(value, str):
        raise ValueError(f"messages[{index}] needs a string {key!r}, got {type(value).__name__}")
    return value
