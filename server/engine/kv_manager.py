"""KV block bookkeeping for Gemma's two attention types (torch-free).

Global (full-attention) layers use a paged table that grows with the sequence. Sliding-window
layers use a ring of at most R = ceil(window / block_size) blocks per request: position p lives
in block ring[(p // B) % R], so a request never holds more than R blocks there however long it
runs. Rings grow lazily (a short request holds only the blocks it fills) and wrap once full.
Each type has its own BlockPool; a request's allocation succeeds in both pools or in neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockTables:
    """Per-request block lists over one pool; ring_blocks 0 means unbounded (paged)."""

    def __init__(self, pool_blocks: int, block_size: int, ring_blocks: int) -> None:
        self.pool = BlockPool(pool_blocks)
        self.block_size = block_size
        self.ring_blocks = ring_blocks
        self._tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens holds in this pool."""
        n = cdiv(num_tokens, self.block_size)
        return min(n, self.ring_blocks) if self.ring_blocks else n

    def missing(self, request_id: str, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(request_id, ())))

    def grow(self, request_id: str, num_tokens: int) -> None:
        n = self.missing(request_id, num_tokens)
        if n:
            self._tables.setdefault(request_id, []).extend(self.pool.allocate(n))

    def free(self, request_id: str) -> None:
        self.pool.free(self._tables.pop(request_id, []))

    def table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def owners(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self._tables.items()}


@dataclass(frozen=True)
class KVUsage:
    global_ratio: float
    local_ratio: float


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
    ) -> None:
        self.block_size = block_size
        self.ring_blocks = cdiv(window, block_size)
        self.has_global, self.has_local = has_global, has_local
        self.global_tables = BlockTables(num_global_blocks if has_global else 0, block_size, 0)
        self.local_tables = BlockTables(
            num_local_blocks if has_local else 0, block_size, self.ring_blocks
        )

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

    def try_grow(self, request_id: str, num_tokens: int) -> bool:
        """Make room for the request's first num_tokens tokens in both pools, or change nothing."""
        pools = self._pools()
        if any(t.missing(request_id, num_tokens) > t.pool.num_free for t in pools):
            return False
        for t in pools:
            t.grow(request_id, num_tokens)
        return True

    def free(self, request_id: str) -> None:
        for t in self._pools():
            t.free(request_id)

    def usage(self) -> KVUsage:
        return KVUsage(self.global_tables.pool.usage, self.local_tables.pool.usage)

    def block_table(self, request_id: str) -> list[int]:
        return self.global_tables.table(request_id)

    def ring_table(self, request_id: str) -> list[int]:
        return self.local_tables.table(request_id)
