"""GET /tokenizer_info (vLLM's, behind --enable-tokenizer-info-endpoint): the tokenizer's
configuration as Hugging Face's tokenizer_config.json holds it, so that a client can tokenize
through /tokenize and /detokenize and render chats without downloading anything.

vLLM answers with the HF tokenizer's init kwargs plus `tokenizer_class` and `chat_template`;
lm-eval's remote tokenizer (`tokenizer_backend=remote`) reads `eos_token`, `bos_token` (and
encodes them through /tokenize: control-token strings are parsed there), `pad_token` and
`chat_template`. Here the values come from the served tokenizer itself, not from a file: the
special tokens' own text, Gemma's template (model/chat_template.py) and the served context
length as `model_max_length` (Gemma's file has a placeholder 1e30 there).
"""

from __future__ import annotations

from typing import Any

from gemma_serve.model.chat_template import GEMMA_CHAT_TEMPLATE
from gemma_serve.server.engine_client import EngineClient, TokenizerLike
from gemma_serve.server.state import server_state
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# Gemma's tokenizer class in transformers (a SentencePiece model, as ours)
TOKENIZER_CLASS = "GemmaTokenizer"
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")


def tokenizer_info(engine: EngineClient) -> dict[str, Any]:
    """vLLM's TokenizerInfoResponse for the served tokenizer."""
    tok = engine.tokenizer
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": True,  # completions prompts get BOS unless add_special_tokens is false
        "add_eos_token": False,
        "bos_token": tok.token_text(tok.bos_id),
        "eos_token": tok.token_text(tok.eos_id),
        "pad_token": None if tok.pad_id is None else tok.token_text(tok.pad_id),
        "additional_special_tokens": [m for m in TURN_MARKERS if _is_control(tok, m)],
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "model_max_length": engine.max_model_len,
        "chat_template": GEMMA_CHAT_TEMPLATE,
    }


def _is_control(tok: TokenizerLike, text: str) -> bool:
    """Whether `text` is one control token of this vocabulary (as /tokenize parses it)."""
    ids = tok.encode_with_control(text, add_bos=False)
    return len(ids) == 1 and tok.token_text(ids[0]) == text


async def get_tokenizer_info(request: Request) -> Response:
    """GET /tokenizer_info; the route exists only with --enable-tokenizer-info-endpoint."""
    engine = server_state(request).require_engine()
    return JSONResponse(tokenizer_info(engine))
