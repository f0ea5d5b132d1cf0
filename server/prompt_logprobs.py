"""vLLM's `prompt_logprobs` response field, from the engine's scored prompt tokens."""

from __future__ import annotations

from collections.abc import Sequence

from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine_client import TokenizerLike
from gemma_serve.server.protocol import PromptLogprob, PromptLogprobs


def prompt_logprobs(
    tokenizer: TokenizerLike,
    prompt_ids: Sequence[int],
    scored: Sequence[TokenLogprob | None],
    k: int,
) -> PromptLogprobs:
    """Per prompt token (the first null, nothing precedes it): the token itself and the top
    `k` alternatives by id, as vLLM returns them. The engine may have scored more
    alternatives for echo + logprobs; only `k` are kept."""
    out: PromptLogprobs = []
    for token, lp in zip(prompt_ids, scored, strict=True):
        if lp is None:
            out.append(None)
            continue
        top = lp.top[:k]
        entry = {
            t: PromptLogprob(logprob=v, rank=rank, decoded_token=tokenizer.token_text(t))
            for rank, (t, v) in enumerate(top, start=1)
        }
        if token not in entry:
            rank = next((r for r, (t, _) in enumerate(lp.top, start=1) if t == token), None)
            entry[token] = PromptLogprob(
                logprob=lp.logprob, rank=rank, decoded_token=tokenizer.token_text(token)
            )
        out.append(dict(sorted(entry.items(), key=lambda kv: kv[0] != token)))
    return out
