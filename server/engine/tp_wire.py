"""The messages rank 0 sends to the other tensor-parallel ranks, as bytes (torch).

Three kinds: start (the KV cache layout rank 0 sized), step (a ModelBatch) and stop. Only what
the forward pass reads travels in a step: the flat ids and positions, the attention layout and
each pool's addressing, the sampled rows and the prompt-scoring rows (the other ranks take part
in the same LM-head gathers). Requests, sampling parameters and scoring owners stay on rank 0.

The format is a JSON header and raw integer arrays, never pickle (the bytes come from the
network; tests/test_server_security.py): u64 header length | header | arrays, the header naming
each array's dtype (int32 or int64 only) and shape.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
from gemma_serve.server.engine.block_table import PoolKind
from gemma_serve.server.engine.kv_cache import CacheLayout
from gemma_serve.server.engine.prompt_logprobs import PromptScoring
from gemma_serve.server.engine.runner import ModelBatch

DTYPES = {"int32": np.int32, "int64": np.int64}
_LEN = struct.Struct("<Q")


class WireError(ValueError):
    """Bytes that are not a message of this format."""


@dataclass(frozen=True)
class Message:
    """A decoded message: its kind, and the layout (start) or the batch (step)."""

    kind: str  # "start", "step" or "stop"
    layout: CacheLayout | None = None
    batch: ModelBatch | None = None


def _pack(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    header = {**header, "arrays": [[n, str(a.dtype), list(a.shape)] for n, a in arrays.items()]}
    head = json.dumps(header).encode()
    return b"".join([_LEN.pack(len(head)), head, *(a.tobytes() for a in arrays.values())])


def _unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        (size,) = _LEN.unpack_from(data)
        header = json.loads(data[_LEN.size : _LEN.size + size])
        arrays, at = {}, _LEN.size + size
        for name, dtype, shape in header["arrays"]:
            count = int(np.prod(shape))
            a = np.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=at)
            arrays[name] = a.reshape(shape)
            at += a.nbytes
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise WireError(f"not a tensor-parallel message: {exc}") from None
    return header, arrays


def start_message(layout: CacheLayout) -> bytes:
    return _pack({"kind": "start", "layout": dataclasses.asdict(layout)}, {})


def stop_message() -> bytes:
    return _pack({"kind": "stop"}, {})


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def step_message(batch: ModelBatch) -> bytes:
    a, s = batch.attention, batch.scoring
    arrays = {
        "input_ids": _np(batch.input_ids),
        "positions": _np(batch.positions),
        "logits_indices": _np(batch.logits_indices),
        "seq_lens": _np(a.seq_lens),
        "cu_seqlens": _np(a.cu_seqlens),
        "context_lens": _np(a.context_lens),
    }
    pools = []
    for kind, p in a.pools.items():
        arrays[f"slots.{kind.value}"] = _np(p.slot_mapping)
        arrays[f"tables.{kind.value}"] = _np(p.block_tables)
        pools.append([kind.value, p.ring_blocks, p.block_size])
    header = {
        "kind": "step",
        "num_decodes": a.num_decodes,
        "max_prefill_len": a.max_prefill_len,
        "pools": pools,
        "scoring": [list(s.rows), list(s.targets), list(s.tops)],
    }
    return _pack(header, arrays)


def read(data: bytes, device: torch.device) -> Message:
    """A message; a step's batch is on `device` and has no requests (the logits rows are
    enough for a rank other than 0)."""
    header, arrays = _unpack(data)
    kind = header.get("kind")
    if kind == "start":
        return Message(kind, layout=CacheLayout(**header["layout"]))
    if kind == "stop":
        return Message(kind)
    if kind != "step":
        raise WireError(f"unknown message kind {kind!r}")

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name].copy()).to(device)

    pools = {
        PoolKind(k): PoolBatch(t(f"slots.{k}"), t(f"tables.{k}"), ring, block)
        for k, ring, block in header["pools"]
    }
    attention = AttentionBatch(
        num_decodes=header["num_decodes"],
        seq_lens=t("seq_lens"),
        cu_seqlens=t("cu_seqlens"),
        context_lens=t("context_lens"),
        pools=pools,
        max_prefill_len=header["max_prefill_len"],
    )
    rows, targets, tops = (tuple(x) for x in header["scoring"])
    batch = ModelBatch(
        input_ids=t("input_ids"),
        positions=t("positions"),
        attention=attention,
        logits_indices=t("logits_indices"),
        sampling_requests=(),
        scoring=PromptScoring(rows, targets, tops, ()),
    )
    return Message(kind, batch=batch)
