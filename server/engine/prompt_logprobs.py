"""Prompt logprobs (completions with echo + logprobs, as lm-eval-harness scores text): each
prompt token gets the logprob that the position before it gave it, and the top alternatives.

Which rows of a step score which prompt tokens is chosen here (`select`), chunk by chunk as
the prompt is prefilled. The rows are taken from the step's final hidden states and go through
the LM head a slice at a time, so the [rows, vocab] logits stay small whatever the chunk length
(a 262k vocabulary is 1 MiB per row in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampler import token_logprobs
from gemma_serve.server.engine.scheduler import ScheduledChunk

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


def positions(req: Request, start: int, end: int) -> range:
    """Positions in start..end-1 whose logits score a prompt token not scored yet (position p
    scores token p + 1); empty unless the request asks for prompt logprobs. Scored tokens are
    kept across preemptions, so a recomputed prompt is not scored twice."""
    if req.params.prompt_logprobs is None:
        return range(0)
    first = max(start, len(req.prompt_logprobs) - 1, 0)
    return range(first, max(first, min(end, req.num_prompt_tokens - 1)))


def select(chunks: Sequence[ScheduledChunk]) -> PromptScoring:
    """The rows of a step's flat batch (its chunks laid end to end) that score prompt tokens."""
    rows: list[int] = []
    targets: list[int] = []
    tops: list[int] = []
    owners: list[tuple[Request, int]] = []
    first_row = 0  # the chunk's first row in the flat batch
    for c in chunks:
        req, scored = c.request, positions(c.request, c.start, c.end)
        if scored:
            rows += [first_row + p - c.start for p in scored]
            targets += req.prompt_ids[scored.start + 1 : scored.stop + 1]
            tops += [req.params.prompt_logprobs or 0] * len(scored)
            owners.append((req, len(scored)))
        first_row += c.num_tokens
    return PromptScoring(tuple(rows), tuple(targets), tuple(tops), tuple(owners))


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
