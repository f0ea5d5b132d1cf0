"""Prompt logprobs (completions with echo + logprobs, as lm-eval-harness scores text): each
prompt token gets the logprob that the position before it gave it, and the top alternatives.

The rows are taken from the step's final hidden states and go through the LM head a slice at a
time, so the [rows, vocab] logits stay small whatever the chunk length (a 262k vocabulary is
1 MiB per row in fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampler import token_logprobs

SLICE_ROWS = 128


@dataclass(frozen=True)
class PromptScoring:
    """The rows of one step that score prompt tokens, and whose they are."""

    rows: tuple[int, ...]  # rows of the flat batch (position p scores prompt token p + 1)
    targets: tuple[int, ...]  # the prompt token each row scores
    tops: tuple[int, ...]  # how many alternatives each row reports
    owners: tuple[tuple[Request, int], ...]  # (request, its number of rows), in row order

    @classmethod
    def empty(cls) -> PromptScoring:
        return cls((), (), (), ())


def score(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    scoring: PromptScoring,
) -> list[TokenLogprob]:
    """One TokenLogprob per scoring row; hidden [len(rows), H] are those rows' final states."""
    out: list[TokenLogprob] = []
    for s in range(0, len(scoring.rows), SLICE_ROWS):
        e = min(s + SLICE_ROWS, len(scoring.rows))
        logprobs = torch.log_softmax(compute_logits(hidden[s:e]), dim=-1)
        targets = torch.tensor(scoring.targets[s:e], device=hidden.device)
        out += token_logprobs(logprobs, targets, list(range(e - s)), list(scoring.tops[s:e]))
    return out


def record(scoring: PromptScoring, scored: list[TokenLogprob]) -> None:
    """Append each request's newly scored prompt tokens to its prompt_logprobs."""
    at = 0
    for req, n in scoring.owners:
        req.prompt_logprobs.extend(scored[at : at + n])
        at += n
