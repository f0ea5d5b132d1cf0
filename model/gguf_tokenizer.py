"""A GGUF file's tokenizer.ggml.* metadata rebuilt as the SentencePiece model it came from."""

from __future__ import annotations

from typing import Any

import numpy as np
from gemma_serve.model.gguf import GGUFError
from gguf import TokenType
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

WHITESPACE = "\u2581"  # SentencePiece's escaped space


def sentencepiece_model(metadata: dict[str, Any]) -> sp_pb2.ModelProto:
    """Rebuild the SentencePiece BPE model that llama.cpp turned into the tokenizer.ggml.* keys."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "llama":  # llama.cpp's "llama" = SentencePiece (Gemma's is BPE, merged by score)
        raise GGUFError(f"tokenizer {kind!r} is not a SentencePiece vocabulary")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores", np.zeros(len(tokens), np.float32))
    types = metadata.get("tokenizer.ggml.token_type", np.full(len(tokens), TokenType.NORMAL))
    special = {
        name: int(metadata[f"tokenizer.ggml.{key}_token_id"])
        for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in metadata
    }
    unk = special.setdefault("unk", 0)
    valid = {int(t) for t in TokenType}
    model = sp_pb2.ModelProto()
    seen: set[str] = set()
    for i, (token, score, ttype) in enumerate(
        zip(tokens, scores.tolist(), types.tolist(), strict=True)
    ):
        piece = _piece(token, ttype, seen)
        seen.add(piece)
        if i == unk:  # files often label <unk> CONTROL; SentencePiece needs exactly one UNKNOWN
            ttype = TokenType.UNKNOWN
        elif ttype == TokenType.UNKNOWN:
            ttype = TokenType.CONTROL
        elif ttype not in valid:
            ttype = TokenType.NORMAL
        model.pieces.add(piece=piece, score=score, type=ttype)
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = bool(np.any(types == TokenType.BYTE))
    # Training-time options, set as in Gemma's own tokenizer.model for fidelity.
    trainer.split_digits = trainer.allow_whitespace_only_pieces = True
    for name in ("unk", "bos", "eos", "pad"):
        token_id = special.get(name, -1)
        setattr(trainer, f"{name}_id", token_id)
        if token_id >= 0:
            setattr(trainer, f"{name}_piece", model.pieces[token_id].piece)
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model


def _piece(token: str, ttype: int, seen: set[str]) -> str:
    """The SentencePiece spelling of a GGUF token, unique within the vocabulary."""
    # llama.cpp writes some whitespace-run tokens with real spaces; SentencePiece escapes spaces
    # in the input to U+2581 first, so a piece with a space could never match.
    piece = token.replace(" ", WHITESPACE) if ttype != TokenType.BYTE else token
    if piece in seen and token not in seen:
        piece = token
    # SentencePiece rejects empty and duplicate pieces; keep the id, make the piece unreachable.
    return piece if piece and piece not in seen else f"<gguf_unreachable_{len(seen)}>"
