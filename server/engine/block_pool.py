"""A pool of fixed-size KV blocks with reference counts and a prefix cache (torch-free).

A block whose refcount drops to 0 is free, but if it holds a registered prefix block its
contents stay findable (`lookup`) until it is handed out again: free blocks are reused least
recently freed first, so the cached prefixes that were used last survive longest. A block is
registered under a `BlockKey`: a SHA-256 digest of its tokens and of every block before it,
with the tokens and the parent's digest, all compared by `lookup` (a wrong hit would need a
SHA-256 collision).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockKey:
    """Identity of a full block of prompt tokens at a given place in a prefix chain."""

    hash: bytes  # SHA-256 of the parent's digest and this block's tokens
    parent: bytes | None  # the previous block's digest; None for a prompt's first block
    tokens: tuple[int, ...]

    @classmethod
    def chain(cls, tokens: list[int], block_size: int, num_blocks: int) -> list[BlockKey]:
        """Keys of the first num_blocks full blocks of `tokens`."""
        keys: list[BlockKey] = []
        parent = None
        for i in range(num_blocks):
            block = tuple(tokens[i * block_size : (i + 1) * block_size])
            digest = hashlib.sha256((parent or b"") + array("q", block).tobytes()).digest()
            keys.append(cls(digest, parent, block))
            parent = digest
        return keys


class BlockPool:
    """Hands out block ids 0..num_blocks-1; a block is free when its refcount drops to 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # key digest -> block
        self._key_of: dict[int, BlockKey] = {}  # block -> its key, while registered

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        """n blocks with refcount 1, the least recently freed first (their cached prefix, if
        any, is forgotten); raises MemoryError when fewer are free."""
        if n > len(self._free):
            raise MemoryError(f"{n} blocks requested, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._forget(b)
            self._refcount[b] = 1
            blocks.append(b)
        return blocks

    def share(self, block: int) -> None:
        """One more holder of `block`; a free block (a cached prefix) is taken back."""
        if self._refcount[block] == 0:
            if block not in self._key_of:
                raise ValueError(f"block {block} is free and holds no cached prefix")
            del self._free[block]
        self._refcount[block] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free[b] = None

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def register(self, block: int, key: BlockKey) -> None:
        """Make a held block's contents findable under `key` (first registration wins)."""
        if self._refcount[block] <= 0:
            raise ValueError(f"block {block} is free and cannot be registered")
        if key.hash in self._cached or block in self._key_of:
            return
        self._cached[key.hash] = block
        self._key_of[block] = key

    def is_registered(self, block: int) -> bool:
        return block in self._key_of

    def forget(self, block: int) -> None:
        """Unregister a block whose contents are about to be overwritten."""
        self._forget(block)

    def lookup(self, key: BlockKey) -> int | None:
        """The block registered under exactly `key`, held or free, or None."""
        block = self._cached.get(key.hash)
        return block if block is not None and self._key_of[block] == key else None

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key.hash]
