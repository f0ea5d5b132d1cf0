"""The int8 layout of a converted checkpoint, cached beside it so that later starts skip the
fp32 weights entirely (no fp32 copy is ever allocated, and start-up reads 4x fewer bytes).

One safetensors file: per projection `<name>.q` (int8) and `<name>.scale` (an untied LM head's
as `lm_head.q` / `.scale`), the embedding table's `model.embed_tokens.q` / `.scale`, and every float
parameter the int8 model keeps (the norms). The int8 tensors are read through a memory map:
what the model keeps of them is copied out (oneDNN's packed layout, the plain rows of
`deploy.install_int8`), and the map is dropped, so the file's pages are not kept resident.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch
from gemma_serve.model.safetensors_stream import DTYPES
from safetensors.torch import save_file

FILE_NAME = "int8.safetensors"
# Bumped whenever the quantisation (model/int8_gemm.py, model/deploy.py) changes what it stores.
FORMAT = "gemma-serve-int8-v2"

log = logging.getLogger(__name__)


def save(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write atomically (a crash leaves no half-written cache)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)


def load(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state, or None when there is none or it is of another format."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        if header.get("__metadata__", {}).get("format") != FORMAT:
            log.info("int8 cache %s is of another format: rebuilding it", path)
            return None
        nbytes = path.stat().st_size
        data = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
        raw = torch.empty(0, dtype=torch.uint8).set_(data)
        state = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + size + o for o in info["data_offsets"])
            dtype = DTYPES[info["dtype"]]
            chunk = raw[start:end]
            # int8 stays a view of the map; other dtypes (scales, norms: small) are copied so
            # that their alignment does not matter.
            t = chunk.view(dtype) if dtype.itemsize == 1 else chunk.clone().view(dtype)
            state[name] = t.view(info["shape"])
        return state
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("int8 cache %s is unreadable (%s): rebuilding it", path, exc)
        return None
