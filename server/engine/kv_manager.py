"""KV block bookkeeping for Gemma's attention types, one pool each (torch-free).

Like vLLM v1's one manager per attention spec: global (full-attention) layers use paged tables
(`paged_table.py`), sliding-window layers rings of at most R blocks per request
(`ring_table.py`), each over its own BlockPool. This manager holds one table per attention type
the model has and loops over them; a request's allocation succeeds in every pool or in none.

Prefix caching: every full block of a prompt, once computed, is registered in each pool under a
key that chains the tokens of all blocks before it. A new request starts from the longest run
of cached prompt blocks that every pool can serve (each pool answers for itself: a paged table
needs all of them, a ring only its last R, all a query after the prefix can see), sharing those
blocks instead of recomputing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gemma_serve.server.engine.block_pool import BlockKey
from gemma_serve.server.engine.block_table import (
    UNBOUNDED,
    BlockTable,
    Cover,
    Growth,
    PoolInputs,
    PoolKind,
)
from gemma_serve.server.engine.paged_table import PagedTable
from gemma_serve.server.engine.ring_table import RingTable, ring_size

if TYPE_CHECKING:  # kv_cache imports torch; only its CacheLayout's counts are read here
    from gemma_serve.model.config import ModelConfig
    from gemma_serve.server.engine.kv_cache import CacheLayout


@dataclass
class _PrefixState:
    """A request's full prompt blocks: their keys, and how far they are registered."""

    keys: list[BlockKey]
    reusable: int  # blocks a hit may cover: the last prompt token is always computed
    registered: int = 0  # blocks 0..registered-1 are registered (or were found cached)


@dataclass(frozen=True)
class KVUsage:
    global_ratio: float
    local_ratio: float


class KVCacheManager:
    """Every pool behind one interface: grow a request to n tokens, free it, report usage."""

    def __init__(
        self,
        num_global_blocks: int,
        num_local_blocks: int,
        block_size: int,
        window: int,
        has_global: bool = True,
        has_local: bool = True,
        prefix_caching: bool = False,
        lookahead: int = 0,
    ) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Only the attention types the model has get a pool; everything below loops over them.
        self.pools: dict[PoolKind, BlockTable] = {}
        if has_global:
            self.pools[PoolKind.GLOBAL] = PagedTable(num_global_blocks, block_size)
        if has_local:
            ring = ring_size(window, block_size, lookahead)  # lookahead: speculative k
            self.pools[PoolKind.LOCAL] = RingTable(num_local_blocks, block_size, ring)
        self._prefix: dict[str, _PrefixState] = {}
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache, in all

    @classmethod
    def for_layout(
        cls, layout: CacheLayout, cfg: ModelConfig, prefix_caching: bool, lookahead: int = 0
    ) -> KVCacheManager:
        """The manager of a cache laid out by `layout` for a model of `cfg`."""
        return cls(
            layout.num_global_blocks,
            layout.num_local_blocks,
            layout.block_size,
            cfg.sliding_window,
            has_global=bool(cfg.full_layers),
            has_local=bool(cfg.sliding_layers),
            prefix_caching=prefix_caching,
            lookahead=lookahead,
        )

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits in the empty cache at all."""
        return all(t.blocks_for(num_tokens) <= t.pool.num_blocks for t in self.pools.values())

    def max_tokens_that_fit(self) -> int:
        """The longest sequence the empty cache can hold (a pool of one whole ring never
        limits it)."""
        return min((t.max_tokens() for t in self.pools.values()), default=UNBOUNDED)

    def _cover_that_fits(self, request_id: str, cover: Cover) -> Cover | None:
        """`cover` with the first way of growing (see `Growth`: keeping cached prefixes, else
        minimal) for which every pool has the free blocks; None when neither fits."""
        for growth in Growth:
            attempt = cover if growth is cover.growth else replace(cover, growth=growth)
            if all(t.missing(request_id, attempt) <= t.pool.num_free for t in self.pools.values()):
                return attempt
        return None

    def try_grow(self, request_id: str, num_tokens: int, context_from: int | None = None) -> bool:
        """Make room for the request's first num_tokens tokens in every pool, or change nothing.

        context_from: the first position of a prefill chunk (None for a decode).
        """
        state = self._prefix.get(request_id)
        cacheable = len(state.keys) if state is not None else 0  # full prompt blocks
        cover = Cover(num_tokens, context_from, transient_below=cacheable)
        fitting = self._cover_that_fits(request_id, cover)
        if fitting is None:
            return False
        for t in self.pools.values():
            t.grow(request_id, fitting)
        return True

    def commit(self, request_id: str) -> None:
        """The request's step is done: release what its prefill kept for reading."""
        for t in self.pools.values():
            t.commit(request_id)

    def try_admit(
        self, request_id: str, prompt_ids: list[int], num_tokens: int, budget: int, reuse: bool
    ) -> tuple[int, int] | None:
        """Admit a new (or preempted) request of num_tokens known tokens with at most `budget`
        of them this step: (first position to compute, how many), or None if it does not fit.

        With prefix caching (and `reuse`), the longest cached run of its prompt's blocks is
        shared rather than recomputed; at least the last prompt token is always computed.
        """
        b = self.block_size
        if self.prefix_caching:
            keys = BlockKey.chain(prompt_ids, b, len(prompt_ids) // b)
            self._prefix[request_id] = _PrefixState(keys, (len(prompt_ids) - 1) // b)
        hit = self._longest_hit(request_id) if self.prefix_caching and reuse else 0
        start = hit * b
        n = min(num_tokens - start, budget)
        if hit:
            for t in self.pools.values():
                t.adopt(request_id, self._prefix[request_id].keys, hit)
        if not self.try_grow(request_id, start + n, start if n > 1 else None):
            self.free(request_id)  # the shared blocks go back to the cache
            return None
        if hit:
            self._prefix[request_id].registered = hit
            self.num_cached_tokens += start
        return start, n

    def _longest_hit(self, request_id: str) -> int:
        """The most prompt blocks every pool can start from, leaving the last prompt token to
        compute. Each pool lowers the bound to what it can serve, until none lowers it."""
        state = self._prefix[request_id]
        k = state.reusable
        while True:
            bound = k
            for t in self.pools.values():
                k = t.cached_run(state.keys, k)
            if k == bound:
                return k

    def computed(self, request_id: str, end: int, num_prompt_tokens: int) -> None:
        """Positions up to end-1 now have their K/V: register the prompt blocks completed."""
        state = self._prefix.get(request_id)
        if state is None:
            return
        full = min(end, num_prompt_tokens) // self.block_size
        for i in range(state.registered, full):
            # A ring still holds block i only if no write of its positions was skipped (a
            # chunk longer than the ring skips its first positions, whose blocks it released).
            for t in self.pools.values():
                t.register(request_id, i, state.keys[i])
        state.registered = max(state.registered, full)

    def free(self, request_id: str) -> None:
        for t in self.pools.values():
            t.free(request_id)
        self._prefix.pop(request_id, None)

    def usage(self) -> KVUsage:
        ratios = {kind: t.pool.usage for kind, t in self.pools.items()}
        return KVUsage(ratios.get(PoolKind.GLOBAL, 0.0), ratios.get(PoolKind.LOCAL, 0.0))

    def batch_inputs(self, spans: Sequence[tuple[str, int, int]]) -> dict[PoolKind, PoolInputs]:
        """Each pool's slots and block-table rows for a step's chunks, (request id, start, end)
        each: what the runner turns into tensors."""
        return {kind: t.batch_inputs(spans) for kind, t in self.pools.items()}
