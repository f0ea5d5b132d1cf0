"""Token selection from the soft-capped logits: penalties, bias, temperature, top-k/p, min-p.

Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws exactly from p;
each seeded request draws its noise from its own generator, so its tokens do not depend on what
else is in the batch. Logprobs are of the model's distribution (log_softmax of the capped
logits), before any sampling transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.outputs import TokenLogprob
from server.engine.request import Request

NEG_INF = float("-inf")


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

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: tuple[Request, ...]) -> SamplerOutput:
        want_logprobs = [r.params.logprobs is not None for r in requests]
        logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = self._adjust(logits, requests)
        greedy = [r.params.greedy for r in requests]
        tokens = logits.argmax(dim=-1) if all(greedy) else self._sample(logits, requests, greedy)
        token_list = tokens.tolist()
        lp_out: list[TokenLogprob | None] = [None] * len(requests)
        if logprobs is not None:
            for i, r in enumerate(requests):
                if want_logprobs[i]:
                    lp_out[i] = _token_logprob(logprobs[i], token_list[i], r.params.logprobs or 0)
        return SamplerOutput(token_list, lp_out)

    def _adjust(self, logits: torch.Tensor, requests: tuple[Request, ...]) -> torch.Tensor:
        """Bias, min_tokens suppression and penalties; copies logits only when needed."""
        copied = False
        for i, r in enumerate(requests):
            p = r.params
            edits = p.logit_bias or p.needs_penalties or len(r.output_ids) < p.min_tokens
            if not edits:
                continue
            if not copied:
                logits, copied = logits.clone(), True
            row = logits[i]
            if p.logit_bias:
                ids = torch.tensor([t for t, _ in p.logit_bias], device=row.device)
                row.index_add_(
                    0, ids, torch.tensor([b for _, b in p.logit_bias], device=row.device)
                )
            if len(r.output_ids) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                row[list(banned)] = NEG_INF
            if p.needs_penalties:
                _apply_penalties(row, r)
        return logits

    def _sample(
        self, logits: torch.Tensor, requests: tuple[Request, ...], greedy: list[bool]
    ) -> torch.Tensor:
        temps = torch.tensor(
            [r.params.temperature if not g else 1.0 for r, g in zip(requests, greedy)],
            device=logits.device,
        )
        scaled = _filter(logits / temps[:, None], requests)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for i, r in enumerate(requests):
            if r.params.seed is not None and not greedy[i]:
                noise[i].exponential_(generator=self._request_generator(r))
        tokens = (probs / noise).argmax(dim=-1)
        greedy_mask = torch.tensor(greedy, device=logits.device)
        return torch.where(greedy_mask, logits.argmax(dim=-1), tokens)

    def _request_generator(self, r: Request) -> torch.Generator:
        gen = self._request_generators.get(r.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(r.params.seed or 0)
            self._request_generators[r.request_id] = gen
        return gen


def _apply_penalties(row: torch.Tensor, r: Request) -> None:
    p = r.params
    if p.repetition_penalty != 1.0:  # over prompt and output, as in vLLM / HF
        seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if r.output_ids and (p.frequency_penalty or p.presence_penalty):  # OpenAI: output only
        ids = torch.tensor(r.output_ids, device=row.device)
        counts = torch.bincount(ids, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(logits: torch.Tensor, requests: tuple[Request, ...]) -> torch.Tensor:
    """top-k, top-p and min-p, row by row parameters, only when some request uses them."""
    top_k = [r.params.top_k if r.params.top_k > 0 else 0 for r in requests]
    top_p = [r.params.top_p for r in requests]
    min_p = [r.params.min_p for r in requests]
    vocab = logits.shape[-1]
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


def _token_logprob(row: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        vals, ids = row.topk(top_n)
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(row[token]), top)
