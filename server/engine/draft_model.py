"""Draft-model speculation: a smaller Gemma with the same tokenizer drafts k tokens (torch).

The draft model has its own KV pools (paged + rings, rings sized for the lookahead k) and its
own prefix cache, from a share of the one KV budget (`split_budget`). Per speculating request
it knows how many of the request's tokens it has computed; each step it catches up on the
tokens it has not seen (the whole prompt at first, or again after its state was dropped; the
target's last accepted token after a verification) in one forward that also drafts the first
token, then drafts the others one decode each, all requests batched. Its drafts are its
greedy tokens: a point-mass proposal, so the target's acceptance rule (spec_verify.py) is
exact rejection sampling for it too.

Kept in step with the target by construction: a request's tokens only ever grow, so what the
draft computed stays valid; positions of rejected drafts are rolled back by the count. A
request that leaves the running batch (finished, aborted, preempted) has its draft state
freed at the next step, and one whose draft KV cannot grow drops it and does not speculate
that step; either recomputes later (through the draft's prefix cache where it can).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model.config import ModelConfig
from gemma_serve.server.engine import model_source
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.kv_cache import (
    CacheLayout,
    KVCache,
    kv_bytes_per_token,
    kv_cache_dtype,
)
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.runner import Runner
from gemma_serve.server.engine.scheduler import ScheduledChunk, SchedulerOutput
from gemma_serve.server.engine.spec_config import NGRAM, SpeculativeConfig
from gemma_serve.server.engine.speculator import NgramSpeculator, usable_draft_len

UNLIMITED = 1 << 30  # the draft's catch-up is not chunked


def split_budget(
    budget: int, target: ModelConfig, draft: ModelConfig, dtype: torch.dtype
) -> tuple[int, int]:
    """(target's, draft's) bytes of one KV budget, in proportion to their bytes per token, so
    both hold about as many tokens."""
    t, d = kv_bytes_per_token(target, dtype), kv_bytes_per_token(draft, dtype)
    draft_bytes = budget * d // (t + d)
    return budget - draft_bytes, draft_bytes


def load_draft(
    config: EngineConfig, spec: SpeculativeConfig, target: model_source.LoadedModel
) -> model_source.LoadedModel:
    """The draft model (same device and options as the target); ValueError when its
    vocabulary is not the target's."""
    loaded = model_source.load(replace(config, model=spec.model, speculative_config=None))
    if loaded.config.vocab_size != target.config.vocab_size or (
        loaded.tokenizer.vocab_size != target.tokenizer.vocab_size
    ):
        raise ValueError(
            f"--speculative-config: the draft model {spec.model!r} has a vocabulary of "
            f"{loaded.config.vocab_size} ids (tokenizer {loaded.tokenizer.vocab_size}), the "
            f"target {target.config.vocab_size} ({target.tokenizer.vocab_size}): a draft model "
            "must share the target's tokenizer"
        )
    return loaded


class DraftModelSpeculator:
    """Drafts with a smaller model over its own KV pools."""

    def __init__(
        self,
        spec: SpeculativeConfig,
        loaded: model_source.LoadedModel,
        ops: AttentionOps,
        kv_dtype: torch.dtype,
        budget: int,
        block_size: int,
        max_model_len: int,
        enable_prefix_caching: bool,
        max_num_seqs: int,
    ) -> None:
        self.config, self.max_model_len = spec, max_model_len
        k = spec.num_speculative_tokens
        mcfg = loaded.config
        layout = CacheLayout.from_budget(
            mcfg, budget, block_size, max_num_seqs, kv_dtype, max_model_len, k
        )
        self.kv = KVCacheManager.for_layout(layout, mcfg, enable_prefix_caching, lookahead=k)
        cache = KVCache(mcfg, layout, loaded.device)
        self.runner = Runner(loaded.model, cache, self.kv, ops, loaded.device)
        self.layout = layout
        # request id -> (tokens of the request the draft had computed before its last draft
        # tokens, the draft tokens it then fed back): what of it is still valid is decided
        # against the request's tokens at the next step (`_valid`).
        self._state: dict[str, tuple[int, list[int]]] = {}
        self._computed: dict[str, int] = {}  # this step: request tokens the draft computed

    def lookahead(self) -> int:
        return self.config.num_speculative_tokens

    def reset(self) -> None:
        """After a failed drafting: drop every request's draft state (recomputed later)."""
        for rid in list(self._state):
            self._drop(rid)

    def drafts(self, running: Sequence[Request]) -> dict[str, list[int]]:
        """Draft tokens for this step, by request id."""
        live = {r.request_id for r in running}
        for rid in [rid for rid in self._state if rid not in live]:
            self._drop(rid)
        if not self.config.speculates_at(len(running)):
            return {}
        want = {
            r.request_id: n
            for r in running
            if (n := usable_draft_len(r, self.config.num_speculative_tokens, self.max_model_len))
        }
        reqs = reqs_all = [r for r in running if r.request_id in want and self._catch_up(r)]
        drafted: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        for j in range(max(want.values(), default=0)):
            reqs = [r for r in reqs if len(drafted[r.request_id]) < want[r.request_id]]
            if j and reqs:
                reqs = [r for r in reqs if self._grow(r, r.num_tokens + j)]
            if not reqs:
                break
            tokens = self._forward(reqs, drafted, first=j == 0)
            for r, t in zip(reqs, tokens, strict=True):
                drafted[r.request_id].append(t)
        for r in reqs_all:
            rid = r.request_id
            if rid in self._computed:  # the request's tokens, then the drafts fed back
                self._state[rid] = (r.num_tokens, drafted[rid][:-1])
        self._computed.clear()
        return {rid: t for rid, t in drafted.items() if t and rid in self._state}

    def _catch_up(self, req: Request) -> bool:
        """Make room for the request's tokens the draft has not computed; False (state
        dropped) when the draft's pools cannot hold them."""
        rid = req.request_id
        if rid not in self._state:
            admitted = self.kv.try_admit(rid, req.prompt_ids, req.num_tokens, UNLIMITED, True)
            if admitted is None:
                return False
            self._computed[rid] = admitted[0]
            self._state[rid] = (admitted[0], [])
            return True
        computed = self._valid(req)
        if not self._grow(req, req.num_tokens, computed):
            return False
        self._computed[rid] = computed
        return True

    def _valid(self, req: Request) -> int:
        """The request's tokens whose draft K/V are still right: those computed before the
        last drafts, then the drafts fed back while they equal the request's tokens (the
        accepted ones); at least the last token is computed again, for its logits."""
        known, fed = self._state[req.request_id]
        actual = req.tokens(known, min(known + len(fed), req.num_tokens))
        n = 0
        while n < len(actual) and actual[n] == fed[n]:
            n += 1
        return min(known + n, req.num_tokens - 1)

    def _grow(self, req: Request, num_tokens: int, chunk_start: int | None = None) -> bool:
        prefill = chunk_start is not None and num_tokens - chunk_start > 1
        if self.kv.try_grow(req.request_id, num_tokens, chunk_start if prefill else None):
            return True
        self._drop(req.request_id)
        return False

    def _drop(self, request_id: str) -> None:
        self.kv.free(request_id)
        self._state.pop(request_id, None)
        self._computed.pop(request_id, None)

    @torch.inference_mode()
    def _forward(
        self, reqs: list[Request], drafted: dict[str, list[int]], first: bool
    ) -> list[int]:
        """One draft forward: the catch-up chunks (first) or each request's last draft token;
        the draft's greedy next token of each."""
        chunks = []
        for r in reqs:
            # The request seen with its drafted tokens as output (no prompt scoring here).
            params = replace(r.params, prompt_logprobs=None)
            view = replace(r, output_ids=r.output_ids + drafted[r.request_id], params=params)
            start = self._computed[r.request_id] if first else view.num_tokens - 1
            chunks.append(ScheduledChunk(view, start, view.num_tokens - start))
        out = SchedulerOutput.of(chunks, [])
        batch = self.runner.build(out)
        tokens = self.runner.forward(batch).logits.argmax(-1).tolist()
        by_id = dict(zip((r.request_id for r in batch.sampling_requests), tokens, strict=True))
        for c in out.chunks:
            rid = c.request.request_id
            self.kv.computed(rid, c.end, c.request.num_prompt_tokens)  # the draft's prefix cache
            self.kv.commit(rid)
        return [by_id[r.request_id] for r in reqs]


def build_speculator(
    config: EngineConfig,
    loaded: model_source.LoadedModel,
    ops: AttentionOps,
    budget: int,
    max_model_len: int,
) -> tuple[NgramSpeculator | DraftModelSpeculator | None, int]:
    """The speculator of config.speculative_config (None: none), and the target's share of
    the KV budget (a draft model takes its part)."""
    spec = config.speculative_config
    if spec is None:
        return None, budget
    if spec.method == NGRAM:
        return NgramSpeculator(spec, max_model_len), budget
    draft = load_draft(config, spec, loaded)
    dtype = kv_cache_dtype(config.kv_cache_dtype, draft.dtype, draft.deployment.quantization)
    target_bytes, draft_bytes = split_budget(budget, loaded.config, draft.config, dtype)
    speculator = DraftModelSpeculator(
        spec,
        draft,
        ops,
        dtype,
        draft_bytes,
        config.block_size,
        max_model_len,
        config.enable_prefix_caching,
        config.max_num_seqs,
    )
    return speculator, target_bytes
