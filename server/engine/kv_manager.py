"""KV block bookkeeping for Gemma's two attention types (torch-free).

Global (full-attention) layers use paged block tables, sliding-window layers rings of at most R
blocks per request (`block_tables.py`). Each type has its own BlockPool; a request's
allocation succeeds in both pools or in neither.

Prefix caching: every full block of a prompt, once computed, is registered in its pool under a
key that chains the tokens of all blocks before it. A new request starts from the longest run
of cached prompt blocks (global blocks from the first one on; local blocks only for the last R
of them, all a query after the prefix can see), sharing those blocks instead of recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_serve.server.engine.block_pool import BlockKey
from gemma_serve.server.engine.block_tables import BlockTables, ring_size


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


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks a new request can start from: its first num_tokens tokens."""

    num_tokens: int
    global_blocks: dict[int, int]  # block index -> block
    local_blocks: dict[int, int]

    @classmethod
    def none(cls) -> PrefixHit:
        return cls(0, {}, {})


class KVCacheManager:
    """Both pools behind one interface: grow a request to n tokens, free it, report usage."""

    def __init__(
        self,
        num_global_blocks: int,
        num_local_blocks: int,
        block_size: int,
        window: int,
        has_global: bool = True,
        has_local: bool = True,
        prefix_caching: bool = False,
    ) -> None:
        self.block_size = block_size
        self.ring_blocks = ring_size(window, block_size)
        self.has_global, self.has_local = has_global, has_local
        self.prefix_caching = prefix_caching
        self.global_tables = BlockTables(num_global_blocks if has_global else 0, block_size, 0)
        self.local_tables = BlockTables(
            num_local_blocks if has_local else 0, block_size, self.ring_blocks
        )
        self._prefix: dict[str, _PrefixState] = {}
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache, in all

    def _pools(self) -> list[BlockTables]:
        pools = []
        if self.has_global:
            pools.append(self.global_tables)
        if self.has_local:
            pools.append(self.local_tables)
        return pools

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens fits in the empty cache at all."""
        return all(t.blocks_for(num_tokens) <= t.pool.num_blocks for t in self._pools())

    def max_tokens_that_fit(self) -> int:
        """The longest sequence the empty cache can hold: the global pool's tokens, and the local
        pool's only when it cannot hold one whole ring (a full ring never limits it)."""
        limits = [self.global_tables.pool.num_blocks * self.block_size] if self.has_global else []
        local = self.local_tables.pool.num_blocks
        if self.has_local and local < self.local_tables.ring_blocks:  # not even one whole ring
            limits.append(local * self.block_size)
        return min(limits) if limits else 1 << 62

    def try_grow(self, request_id: str, num_tokens: int, context_from: int | None = None) -> bool:
        """Make room for the request's first num_tokens tokens in both pools, or change nothing.

        context_from: the first position of a prefill chunk (None for a decode). Ring blocks
        that are cached prefixes are replaced by fresh ones when the pool has room, else
        overwritten in place (only blocks shared with another request must be replaced).
        """
        pools = self._pools()
        for minimal in (False, True):
            if all(
                t.missing(request_id, num_tokens, context_from, minimal) <= t.pool.num_free
                for t in pools
            ):
                state = self._prefix.get(request_id)
                cacheable = len(state.keys) if state is not None else 0  # full prompt blocks
                for t in pools:
                    t.grow(request_id, num_tokens, context_from, minimal, cacheable)
                return True
        return False

    def commit(self, request_id: str) -> None:
        """The request's step is done: release what its prefill kept for reading."""
        for t in self._pools():
            t.commit(request_id)

    def try_admit(
        self, request_id: str, prompt_ids: list[int], num_tokens: int, budget: int, reuse: bool
    ) -> tuple[int, int] | None:
        """Admit a new (or preempted) request of num_tokens known tokens with at most `budget`
        of them this step: (first position to compute, how many), or None if it does not fit.

        With prefix caching (and `reuse`), the longest cached run of its prompt's blocks is
        shared rather than recomputed; at least the last prompt token is always computed.
        """
        if self.prefix_caching:
            b = self.block_size
            keys = BlockKey.chain(prompt_ids, b, len(prompt_ids) // b)
            self._prefix[request_id] = _PrefixState(keys, (len(prompt_ids) - 1) // b)
        hit = self._lookup(request_id) if self.prefix_caching and reuse else PrefixHit.none()
        start = hit.num_tokens
        n = min(num_tokens - start, budget)
        for tables, blocks in (
            (self.global_tables, hit.global_blocks),
            (self.local_tables, hit.local_blocks),
        ):
            if blocks:  # empty for a miss, and for a kind of layer the model lacks
                tables.adopt(request_id, blocks)
        if not self.try_grow(request_id, start + n, start if n > 1 else None):
            self.free(request_id)  # the shared blocks go back to the cache
            return None
        if hit.num_tokens:
            self._prefix[request_id].registered = hit.num_tokens // self.block_size
            self.num_cached_tokens += hit.num_tokens
        return start, n

    def _lookup(self, request_id: str) -> PrefixHit:
        """The longest run of cached prompt blocks that leaves the last prompt token to compute:
        global blocks 0..k-1 and local blocks k-R..k-1, all cached."""
        state = self._prefix[request_id]
        usable = state.keys[: state.reusable]
        found_global: list[int] = []
        for key in usable if self.has_global else ():
            block = self.global_tables.pool.lookup(key)
            if block is None:
                break
            found_global.append(block)
        k = len(found_global) if self.has_global else len(usable)
        local = [self.local_tables.pool.lookup(key) for key in usable[:k]] if self.has_local else []
        # the longest k whose last min(k, R) local blocks are all cached
        while self.has_local and k and None in local[max(0, k - self.ring_blocks) : k]:
            k -= 1
        if not k:
            return PrefixHit.none()
        start = max(0, k - self.ring_blocks)
        return PrefixHit(
            k * self.block_size,
            {i: found_global[i] for i in range(k)} if self.has_global else {},
            {i: local[i] for i in range(start, k)} if self.has_local else {},  # type: ignore[misc]
        )

    def computed(self, request_id: str, end: int, num_prompt_tokens: int) -> None:
        """Positions up to end-1 now have their K/V: register the prompt blocks completed."""
        state = self._prefix.get(request_id)
        if state is None:
            return
        full = min(end, num_prompt_tokens) // self.block_size
        for i in range(state.registered, full):
            key = state.keys[i]
            if self.has_global:
                self.global_tables.pool.register(self.global_tables.block_at(request_id, i), key)
            # A ring still holds block i only if no write of its positions was skipped (a
            # chunk longer than the ring skips its first positions, whose blocks it released).
            block = self.local_tables.block_at(request_id, i) if self.has_local else None
            if block is not None:
                self.local_tables.pool.register(block, key)
        state.registered = max(state.registered, full)

    def free(self, request_id: str) -> None:
        for t in self._pools():
            t.free(request_id)
        self._prefix.pop(request_id, None)

    def usage(self) -> KVUsage:
        return KVUsage(self.global_tables.pool.usage, self.local_tables.pool.usage)

    def block_table(self, request_id: str) -> list[int]:
        return self.global_tables.table(request_id)

    def ring_table(self, request_id: str) -> list[int]:
        return self.local_tables.table(request_id)
