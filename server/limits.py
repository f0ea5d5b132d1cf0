"""Input limits that keep one request from monopolising the server, with their defaults.

Each limit is checked before the engine sees the request and answers 400 naming its parameter
(413 for the body size). docs/RELIABILITY.md lists them with the reasoning. Two more limits
live elsewhere: prompt + max_tokens <= the context (--max-model-len, server/params.py) and the
waiting-queue length (--max-queued-requests, 429, the engine).
"""

from __future__ import annotations

from gemma_serve.server.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
)

MAX_BODY_BYTES = 1 << 20  # request body; Settings.max_body_bytes (413)
MAX_N = 16  # choices per prompt (n, best_of)
MAX_PROMPTS = 64  # prompts in one batched /v1/completions request
MAX_CHOICES = 128  # engine requests one HTTP request may start: prompts x n
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM users send more)
MAX_STOP_LEN = 256  # characters per stop string
MAX_LOGIT_BIAS = 300  # logit_bias entries (OpenAI's limit)
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids entries (vLLM's extra)
STRUCTURED_COMPILE_TIMEOUT_S = 10.0  # compiling one output constraint (structured_request.py)
# MAX_LOGPROBS, MIN_TEMPERATURE and the repetition-penalty bounds are the engine's own
# (server/engine/sampling_params.py), re-exported here so that every input limit has one name.

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CHOICES",
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_PROMPTS",
    "MAX_REPETITION_PENALTY",
    "MAX_STOP",
    "MAX_STOP_LEN",
    "MAX_STOP_TOKEN_IDS",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "STRUCTURED_COMPILE_TIMEOUT_S",
]
