"""Refusing prompts that cannot fit the context before tokenizing them.

Tokenizing a 1 MB prompt takes a third of a second of CPU, only to find it is 250,000 tokens
for an 8,192-token context. No token decodes to more bytes than the longest one, and a text
has at least as many UTF-8 bytes as characters, so a prompt of `c` characters has at least
`c / max_token_bytes` tokens: when even that bound fills the context, the request is
refused at once, with the error code and parameter the full check would give.
"""

from __future__ import annotations

from gemma_serve.server.engine_client import TokenizerLike
from gemma_serve.server.errors import APIError


def longest_token_bytes(tokenizer: TokenizerLike) -> int:
    """The UTF-8 length of the longest token (a pass over the vocabulary: run it once)."""
    return max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))


def min_tokens(num_chars: int, max_token_bytes: int) -> int:
    """A lower bound on the token count of a text of `num_chars` characters."""
    return -(-num_chars // max(1, max_token_bytes))


def refuse_hopeless_prompt(
    num_chars: int, max_token_bytes: int | None, max_model_len: int, param: str
) -> None:
    """400 context_length_exceeded when the prompt alone surely fills the context (prompts
    that might fit get the exact check, with max_tokens, once tokenized)."""
    if max_token_bytes is None:
        return  # not known yet: the full check after tokenizing still applies
    at_least = min_tokens(num_chars, max_token_bytes)
    if at_least >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, the "
            f"prompt ({num_chars} characters) has at least {at_least} tokens, leaving no room "
            "for the completion. Please reduce the length of the prompt.",
            param=param,
            code="context_length_exceeded",
        )
