"""Turns a SchedulerOutput into one flat, unpadded batch and runs the model on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from gemma_serve.kernels.dispatch import AttentionOps
from gemma_serve.model.gemma import GemmaForCausalLM
from gemma_serve.server.engine import prompt_logprobs
from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.cache_attention import CacheAttention
from gemma_serve.server.engine.cuda_graphs import DecodeGraphs
from gemma_serve.server.engine.kv_cache import KVCache
from gemma_serve.server.engine.kv_manager import KVCacheManager
from gemma_serve.server.engine.outputs import TokenLogprob
from gemma_serve.server.engine.prompt_logprobs import PromptScoring, score
from gemma_serve.server.engine.request import Request
from gemma_serve.server.engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class ModelBatch:
    """Everything one forward pass needs, already on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionBatch
    logits_indices: torch.Tensor  # rows of T whose logits are sampled
    # in the order of logits_indices: a speculating request once per row it verifies
    sampling_requests: tuple[Request, ...]
    scoring: PromptScoring = PromptScoring.empty()  # rows that score prompt tokens


@dataclass(frozen=True)
class ForwardOutput:
    """The logits of the sampling rows, and the prompt tokens this step scored."""

    logits: torch.Tensor  # fp32 [len(sampling_requests), vocab]
    prompt_logprobs: list[TokenLogprob]  # one per batch.scoring row


class Executor(Protocol):
    """Runs a step's forward pass; the tensor-parallel one (tp_workers.WorkerGroup) first
    sends the batch to the other ranks, which run the same pass on their shards."""

    def run(
        self, batch: ModelBatch, forward: Callable[[ModelBatch], ForwardOutput]
    ) -> ForwardOutput: ...


class Runner:
    def __init__(
        self,
        model: GemmaForCausalLM,
        cache: KVCache,
        kv: KVCacheManager | None,  # None on tensor-parallel ranks other than 0 (no build)
        ops: AttentionOps,
        device: torch.device,
        executor: Executor | None = None,
    ) -> None:
        self.model, self.cache, self.kv, self.ops, self.device = model, cache, kv, ops, device
        self.executor = executor
        self.graphs: DecodeGraphs | None = None  # decode-only steps replay these when set

    def build(self, out: SchedulerOutput) -> ModelBatch:
        chunks = out.chunks
        ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        for c in chunks:
            ids.extend(c.token_ids())
            positions.extend(range(c.start, c.start + c.num_tokens))
            rows = c.num_sample_rows  # 1, or 1 + its draft tokens when it speculates
            logits_rows.extend(range(len(ids) - rows, len(ids)))
            sampling.extend([c.request] * rows)
        dev = self.device
        prefills = out.prefills
        cu = [0]
        for c in prefills:
            cu.append(cu[-1] + c.num_tokens)
        attention = AttentionBatch(
            num_decodes=len(out.decodes),
            seq_lens=_i32([c.start + 1 for c in out.decodes], dev),
            cu_seqlens=_i32(cu, dev),
            context_lens=_i32([c.start for c in prefills], dev),
            pools=self._pools(chunks),
            max_prefill_len=max((c.num_tokens for c in prefills), default=0),
        )
        return ModelBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attention=attention,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            sampling_requests=tuple(sampling),
            scoring=prompt_logprobs.select(chunks),
        )

    def _pools(self, chunks: tuple[ScheduledChunk, ...]) -> dict[PoolKind, PoolBatch]:
        """Each pool's slot mapping and block tables, from the KV manager."""
        spans = [(c.request.request_id, c.start, c.start + c.num_tokens) for c in chunks]
        assert self.kv is not None, "only rank 0 builds batches"
        inputs = self.kv.batch_inputs(spans)
        return {kind: PoolBatch.from_inputs(i, self.device) for kind, i in inputs.items()}

    def forward(self, batch: ModelBatch) -> ForwardOutput:
        """fp32 soft-capped logits of the sampling rows, and the scored prompt tokens."""
        if self.executor is not None:
            return self.executor.run(batch, self.forward_local)
        return self.forward_local(batch)

    @torch.inference_mode()
    def forward_local(self, batch: ModelBatch) -> ForwardOutput:
        """The forward pass on this process's model (one rank's shard under tensor
        parallelism)."""
        scoring = batch.scoring
        if self.graphs is not None and not scoring.rows:
            logits = self.graphs.run(
                batch.input_ids, batch.positions, batch.attention, batch.logits_indices
            )
            if logits is not None:
                return ForwardOutput(logits, [])
        attn = CacheAttention(self.model.config, self.cache, batch.attention, self.ops)
        if not scoring.rows:
            return ForwardOutput(
                self.model(batch.input_ids, batch.positions, attn, batch.logits_indices), []
            )
        n = len(batch.logits_indices)
        extra = torch.tensor(scoring.rows, dtype=torch.long, device=self.device)
        rows = torch.cat([batch.logits_indices, extra])
        hidden = self.model.hidden_states(batch.input_ids, batch.positions, attn, rows)
        logits = self.model.compute_logits(hidden[:n])
        return ForwardOutput(logits, score(self.model.compute_logits, hidden[n:], scoring))


def _i32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)
