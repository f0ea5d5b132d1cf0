"""Verification of draft tokens: the acceptance rule (torch).

A speculating request's chunk is its last token followed by its k draft tokens; the target
model's logits at those k + 1 rows give the distributions p_0..p_k of its next k + 1 tokens,
each as if the draft tokens before it had been accepted. Each row is sampled by the ordinary
sampler with every option (penalties, logit_bias, min_tokens, temperature, top-k/p, min-p),
the row's request seen with the draft tokens before it appended to its output. Draft token j
is accepted while it equals the token t_j sampled at its row; the first t_j that differs (or
t_k after a fully accepted draft) ends the run. So a step yields 1..k+1 tokens.

Why this is exact: t_j is a draw from p_j (greedy: its argmax), the very token decoding
without speculation would pick at that position; a draft token is kept only when it is that
token. For a point-mass proposal q (n-gram drafts) this is rejection sampling: the draft d is
accepted with probability p(d) = min(1, p(d) / q(d)), and on rejection t_j is distributed as
p without d, renormalised: the normalised max(0, p - q). Seeded requests draw row j's noise
from their own generator in order; the draws of rows past the run are taken back
(`Sampler.redraw`), so a seeded request's tokens equal its tokens without speculation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.sampler import Sampler, SamplerOutput, sample_isolating_faults
from gemma_serve.server.engine.scheduler import ScheduledChunk

SampleFn = Callable[[torch.Tensor, tuple[Request, ...]], SamplerOutput]


@dataclass
class Verified:
    """A step's sampled tokens: 1 per ordinary request, 1..k+1 per speculating one."""

    requests: list[Request] = field(default_factory=list)  # those that got tokens
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprob | None]] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # sampling failed for them
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: draft j accepted


def _row_requests(chunks: Sequence[ScheduledChunk]) -> tuple[Request, ...]:
    """One request per sampled row: row j of a speculating chunk sees draft[:j] as output."""
    rows: list[Request] = []
    for c in chunks:
        rows.append(c.request)
        rows += [
            replace(c.request, output_ids=c.request.output_ids + list(c.draft[:j]))
            for j in range(1, len(c.draft) + 1)
        ]
    return tuple(rows)


def _reseeds(sampler: Sampler, chunks: Sequence[ScheduledChunk]) -> dict[str, torch.Tensor]:
    """The generator states of seeded, sampled, speculating requests before the step."""
    return {
        c.request.request_id: sampler.noise_state(c.request)
        for c in chunks
        if c.draft and c.request.params.seed is not None and not c.request.params.greedy
    }


def sample_and_verify(
    sampler: Sampler, logits: torch.Tensor, chunks: Sequence[ScheduledChunk]
) -> Verified:
    """Sample every row of the step's sampling chunks (in the runner's row order) and keep
    each speculating request's accepted run. A request any of whose rows fails to sample
    fails (only that request)."""
    chunks = [c for c in chunks if c.samples]
    states = _reseeds(sampler, chunks)
    rows = _row_requests(chunks)
    ok, out, failed_rows = sample_isolating_faults(sampler, logits, rows)
    failed_ids = {r.request_id for r in failed_rows}
    by_id: dict[str, list[tuple[int, TokenLogprob | None]]] = {}
    for r, t, lp in zip(ok, out.token_ids, out.logprobs, strict=True):
        by_id.setdefault(r.request_id, []).append((t, lp))
    result = Verified()
    for c in chunks:
        req = c.request
        if req.request_id in failed_ids:
            result.failed.append(req)
            continue
        sampled = by_id[req.request_id]
        run = _accepted_run(c.draft, [t for t, _ in sampled])
        _count(result, len(c.draft), run - 1)
        if req.request_id in states and run < len(sampled):
            sampler.redraw(req, states[req.request_id], run, logits.shape[-1])
        result.requests.append(req)
        result.tokens.append([t for t, _ in sampled[:run]])
        result.logprobs.append([lp for _, lp in sampled[:run]])
    return result


def _accepted_run(draft: Sequence[int], sampled: list[int]) -> int:
    """How many sampled tokens the request keeps: the matching draft prefix, plus one."""
    n = 0
    while n < len(draft) and draft[n] == sampled[n]:
        n += 1
    return n + 1


def _count(result: Verified, num_draft: int, num_accepted: int) -> None:
    result.num_draft_tokens += num_draft
    per_pos = result.accepted_per_position
    per_pos.extend([0] * (num_accepted - len(per_pos)))
    for j in range(num_accepted):
        per_pos[j] += 1
