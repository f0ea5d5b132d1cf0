"""Which slice of every weight one tensor-parallel rank holds (Megatron layout). Torch-free.

- Attention: query heads split evenly; KV heads split evenly when there are at least as many as
  ranks, else replicated (each rank keeps the one KV head its query heads read, as for Gemma 3
  270M's single KV head). The fused qkv projection is column-parallel, o_proj row-parallel.
- MLP: the intermediate dimension split evenly: gate/up column-parallel, down row-parallel.
- Embedding and LM head: vocab-parallel. Each rank holds ceil(V / N) rows; the last rank's
  shard is padded with zero rows so that every shard has one shape (the gathered logits are cut
  back to V).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gemma_serve.model.config import ModelConfig


class ShardingError(ValueError):
    """A model that cannot be split over the requested number of ranks."""


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `size`: the ranges of heads, intermediate units and vocabulary it holds."""

    rank: int
    size: int
    q_heads: int  # query heads on this rank
    q_head_start: int
    kv_heads: int  # KV heads on this rank (1 when replicated)
    kv_head_start: int
    ffn: int  # intermediate units on this rank
    ffn_start: int
    vocab_shard: int  # rows of the (padded) embedding shard, the same on every rank
    vocab_start: int
    vocab_rows: int  # real (unpadded) rows of this rank's shard

    @classmethod
    def build(cls, cfg: ModelConfig, rank: int, size: int) -> ShardPlan:
        """The plan of one rank; ShardingError if the model does not split over `size`."""
        if size < 1 or not 0 <= rank < size:
            raise ShardingError(f"rank {rank} is not in a group of {size}")
        hq, hkv, ffn = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        _divides(size, hq, "num_attention_heads")
        _divides(size, ffn, "intermediate_size")
        q_local = hq // size
        if hkv >= size:
            _divides(size, hkv, "num_key_value_heads")
            kv_local, kv_start = hkv // size, rank * (hkv // size)
        elif size % hkv:
            raise ShardingError(
                f"--tensor-parallel-size {size} must be a multiple of num_key_value_heads "
                f"({hkv}) when it exceeds it (KV heads are replicated)"
            )
        else:  # replicated: this rank's query heads all read one KV head
            kv_local, kv_start = 1, rank * q_local // (hq // hkv)
        shard = -(-cfg.vocab_size // size)
        start = min(rank * shard, cfg.vocab_size)
        return cls(
            rank=rank,
            size=size,
            q_heads=q_local,
            q_head_start=rank * q_local,
            kv_heads=kv_local,
            kv_head_start=kv_start,
            ffn=ffn // size,
            ffn_start=rank * (ffn // size),
            vocab_shard=shard,
            vocab_start=start,
            vocab_rows=min(shard, cfg.vocab_size - start),
        )

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of this rank's slice: the network built from it has the shard's shapes
        (heads, intermediate units, vocabulary rows), so model code and the KV cache need no
        knowledge of the split."""
        return dataclasses.replace(
            cfg,
            num_attention_heads=self.q_heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.ffn,
            vocab_size=self.vocab_shard,
        )


def _divides(size: int, value: int, name: str) -> None:
    if value % size:
        raise ShardingError(f"--tensor-parallel-size {size} does not divide {name} ({value})")
