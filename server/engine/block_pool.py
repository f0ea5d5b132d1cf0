"""A pool of fixed-size KV blocks with reference counts (torch-free)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids 0..num_blocks-1; a block is free when its refcount drops to 0.

    Refcounts let several requests share a block later (prefix sharing); today each block has
    one owner. Freed blocks go to the back of the queue so recently used ones are reused last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1; raises MemoryError when fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"{n} blocks requested, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def share(self, block: int) -> None:
        if self._refcount[block] <= 0:
            raise ValueError(f"block {block} is free and cannot be shared")
        self._refcount[block] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refcount[block]
