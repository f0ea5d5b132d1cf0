"""Token selection from the soft-capped logits: penalties, bias, temperature, top-k/p, min-p.

Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws exactly from p;
each seeded request draws its noise from its own generator, so its tokens do not depend on what
else is in the batch. Logprobs are of the model's distribution (log_softmax of the capped
logits; for a structured-output request, after its grammar's mask, structured.py), before
any sampling transform.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.request import Request

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._request_generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: tuple[Request, ...]) -> SamplerOutput:
        """Tokens for each row of logits [N, vocab]; logits are left as they came.

        A call that raises leaves every seeded request's generator as it found it, so a retry
        (the engine samples each request alone after a failed batch) draws the same noise.
        """
        saved = {
            r.request_id: (
                g.get_state() if (g := self._request_generators.get(r.request_id)) else None
            )
            for r in requests
            if r.params.seed is not None and not r.params.greedy
        }
        try:
            return self._call(logits, requests)
        except BaseException:
            for rid, state in saved.items():
                if state is None:
                    self._request_generators.pop(rid, None)
                else:
                    self._request_generators[rid].set_state(state)
            raise

    @torch.inference_mode()
    def _call(self, logits: torch.Tensor, requests: tuple[Request, ...]) -> SamplerOutput:
        want_logprobs = [r.params.logprobs is not None for r in requests]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        # Bias, min_tokens and penalties touch few entries: edit the rows in place and put the
        # originals back afterwards (a clone of [N, vocab] costs more than the whole sampling).
        edits = [(i, e) for i, r in enumerate(requests) if (e := _row_edit(logits[i], r))]
        originals = [(i, ids, logits[i, ids]) for i, (ids, _) in edits]
        try:
            for i, (ids, values) in edits:
                logits[i, ids] = values
            greedy = [r.params.greedy for r in requests]
            tokens = row_argmax(logits) if all(greedy) else self._sample(logits, requests, greedy)
        finally:
            for i, ids, values in originals:
                logits[i, ids] = values
        token_list = tokens.tolist()
        lp_out: list[TokenLogprob | None] = [None] * len(requests)
        if logprobs is not None:
            rows = [i for i, want in enumerate(want_logprobs) if want]
            tops = [requests[i].params.logprobs or 0 for i in rows]
            for i, lp in zip(rows, token_logprobs(logprobs, tokens, rows, tops), strict=True):
                lp_out[i] = lp
        return SamplerOutput(token_list, lp_out)

    def _sample(
        self, logits: torch.Tensor, requests: tuple[Request, ...], greedy: list[bool]
    ) -> torch.Tensor:
        temps = torch.tensor(
            [r.params.temperature if not g else 1.0 for r, g in zip(requests, greedy, strict=True)],
            device=logits.device,
        )
        scaled = _filter(logits / temps[:, None], requests)
        probs = torch.softmax(scaled, dim=-1)
        noise = self._noise(probs, requests, greedy)
        # A draw of exactly 0 would make a filtered token's 0 / 0 a NaN, which argmax picks.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        tokens = row_argmax(probs / noise)
        greedy_mask = torch.tensor(greedy, device=logits.device)
        return torch.where(greedy_mask, row_argmax(logits), tokens)

    def _noise(
        self, probs: torch.Tensor, requests: tuple[Request, ...], greedy: list[bool]
    ) -> torch.Tensor:
        """Exp(1) noise shaped like probs; seeded rows from their request's own generator."""
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for i, r in enumerate(requests):
            if r.params.seed is not None and not greedy[i]:
                noise[i].exponential_(generator=self._request_generator(r))
        return noise

    def noise_state(self, r: Request) -> torch.Tensor:
        """The state of a seeded request's generator, before this step's draws."""
        return self._request_generator(r).get_state()

    def redraw(self, r: Request, state: torch.Tensor, rows: int, vocab: int) -> None:
        """Put a seeded request's generator where `rows` rows of noise from `state` leave it,
        as `_noise` draws them: a speculating request keeps the draws of the rows it used,
        so its next token gets the noise it would have got without speculation."""
        gen = self._request_generator(r)
        gen.set_state(state)
        row = torch.empty(vocab, device=self.device)
        for _ in range(rows):
            row.exponential_(generator=gen)

    def _request_generator(self, r: Request) -> torch.Generator:
        gen = self._request_generators.get(r.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(r.params.seed or 0)
            self._request_generators[r.request_id] = gen
        return gen


def sample_isolating_faults(
    sampler: Callable[[torch.Tensor, tuple[Request, ...]], SamplerOutput],
    logits: torch.Tensor,
    requests: tuple[Request, ...],
) -> tuple[tuple[Request, ...], SamplerOutput, list[Request]]:
    """Sample the batch; if that fails, sample each request alone to isolate the culprit.

    Returns the requests that got a token, their sampler output, and the ones that failed (a
    failed call leaves the generators as they were, so the retries draw the same noise).
    """
    try:
        return requests, sampler(logits, requests), []
    except Exception:
        log.exception("batched sampling failed; retrying request by request")
    ok: list[Request] = []
    tokens: list[int] = []
    logprobs: list[TokenLogprob | None] = []
    failed: list[Request] = []
    for i, r in enumerate(requests):
        try:
            one = sampler(logits[i : i + 1], (r,))
        except Exception:
            log.exception("sampling failed for %s", r.request_id)
            failed.append(r)
            continue
        ok.append(r)
        tokens += one.token_ids
        logprobs += one.logprobs
    return tuple(ok), SamplerOutput(tokens, logprobs), failed


def _row_edit(row: torch.Tensor, r: Request) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A row's logit_bias, min_tokens ban and penalties, as (token ids, new logits) or None.

    Applied in that order: the penalties see the biased logits.
    """
    p = r.params
    ban_eos = len(r.output_ids) < p.min_tokens
    if not (p.logit_bias or ban_eos or p.needs_penalties):
        return None
    bias: dict[int, float] = {}
    for t, b in p.logit_bias:
        bias[t] = bias.get(t, 0.0) + b
    banned: set[int] = set()
    if ban_eos:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
    repeated = set(r.prompt_ids) | set(r.output_ids) if p.repetition_penalty != 1.0 else set()
    counts = Counter(r.output_ids if p.frequency_penalty or p.presence_penalty else ())
    token_ids = sorted(set(bias) | banned | repeated | set(counts))
    dev = row.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
    values = row[ids]  # a copy
    if bias:
        values += torch.tensor([bias.get(t, 0.0) for t in token_ids], device=dev)
    if banned:
        values[torch.tensor([t in banned for t in token_ids], device=dev)] = NEG_INF
    if repeated:  # over prompt and output, as in vLLM / HF
        rp = p.repetition_penalty
        hit = torch.tensor([t in repeated for t in token_ids], device=dev)
        values = torch.where(hit, torch.where(values > 0, values / rp, values * rp), values)
    if counts:  # OpenAI: output tokens only
        c = torch.tensor([counts.get(t, 0) for t in token_ids], device=dev).to(values.dtype)
        values -= p.frequency_penalty * c + p.presence_penalty * (c > 0).to(values.dtype)
    return ids, values


def _filter(logits: torch.Tensor, requests: tuple[Request, ...]) -> torch.Tensor:
    """top-k, top-p and min-p, row by row parameters, only when some request uses them."""
    vocab = logits.shape[-1]
    # 0 disables; so does any k >= vocab (however large: it never reaches a tensor)
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in requests]
    top_p = [r.params.top_p for r in requests]
    min_p = [r.params.min_p for r in requests]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.tensor([k if k else vocab for k in top_k], device=logits.device)[:, None]
        drop = rank >= k
        probs = torch.softmax(sorted_logits.masked_fill(drop, NEG_INF), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop |= before >= torch.tensor(top_p, device=logits.device)[:, None]
        drop[:, 0] = False  # always keep the best token
        logits = torch.full_like(logits, NEG_INF).scatter(
            -1, order, sorted_logits.masked_fill(drop, NEG_INF)
        )
    if any(min_p):
        probs = torch.softmax(logits, dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(-1, keepdim=True)[0]
        logits = logits.masked_fill(probs < floor, NEG_INF)
    return logits


def token_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[int], tops: list[int]
) -> list[TokenLogprob]:
    """The sampled token's logprob and the top-n alternatives of each of `rows`, read back from
    the device together (not per request: each read is a sync on a GPU)."""
    idx = torch.tensor(rows, device=logprobs.device)
    lp, tok = logprobs[idx], tokens[idx]
    vals, ids = lp.topk(max(tops), dim=-1)  # k may be 0: empty [n, 0] results
    # Tokens a grammar masked off have -inf, which JSON cannot carry: vLLM's floor instead.
    floats = torch.cat([lp.gather(1, tok[:, None]), vals], dim=1).clamp(min=LOGPROB_FLOOR).tolist()
    longs = torch.cat([tok[:, None], ids], dim=1).tolist()
    return [
        TokenLogprob(t[0], f[0], tuple(zip(t[1 : n + 1], f[1 : n + 1], strict=True)))
        for f, t, n in zip(floats, longs, tops, strict=True)
    ]


# Columns per block of row_argmax's first pass.
ARGMAX_BLOCK = 128


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a 2-D x, the same indices (the first maximum; a NaN counts as the
    maximum, as in argmax): on CPUs in two passes, since argmax does not vectorise there and
    amax does (32 rows of 262,144 logits: 2.6 -> 0.54 ms; one row 0.26 -> 0.04 ms). The block
    holding a row's first maximum is the first block whose amax is that maximum, and the
    maximum's first position in it is the row's.
    """
    n, v = x.shape
    if x.device.type != "cpu" or v % ARGMAX_BLOCK or v < 32 * ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    blocks = x.unflatten(1, (v // ARGMAX_BLOCK, ARGMAX_BLOCK))
    best = blocks.amax(2).argmax(1)
    inner = blocks[torch.arange(n, device=x.device), best].argmax(1)
    return best * ARGMAX_BLOCK + inner
