"""The int8 layout of a converted checkpoint, cached beside it so that later starts skip the
fp32 weights entirely (no fp32 copy is ever allocated, and start-up reads 4x fewer bytes).

One safetensors file: per projection `<name>.q` (int8) and `<name>.scale` (an untied LM head's
as `lm_head.q` / `.scale`), the embedding table's `model.embed_tokens.q` / `.scale`, and every float
parameter the int8 model keeps (the norms).

The model serves its plain int8 rows straight from the file's memory map (`Mapped`), as
llama.cpp serves its weights: after oneDNN's packed copies are made from it, `Mapped.evict`
drops the pages that packing read from the process, and what is read afterwards comes back as
it is touched: the layers' rows with the first one-sequence step (101 MiB on the default
model), the embedding table's (with a tied head's candidate rows, 160 MiB) as tokens are met.
English text maps most of the table within a few hundred requests (the kernel maps 64 KiB, or
a page-cache folio, around each fault), so what this saves is anonymous memory, not RSS under
load: the pages are the page cache's, clean and shared, which the kernel can reclaim under
pressure instead of failing an allocation (benchmarks/RESULTS.md, ninth session).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from gemma_serve.model.safetensors_stream import DTYPES
from safetensors.torch import save_file

FILE_NAME = "int8.safetensors"
# Bumped whenever the quantisation (model/int8_gemm.py, model/deploy.py) changes what it stores.
FORMAT = "gemma-serve-int8-v2"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mapped:
    """A cache's tensors: the int8 ones views of the file's private, copy-on-write map (never
    written), the others (scales, norms: small) copied out of it."""

    tensors: dict[str, torch.Tensor]
    map: mmap.mmap

    def evict(self) -> None:
        """Unmap every page of the file from this process (the page cache keeps them): a view
        read afterwards takes its pages back as it touches them."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None:  # Linux and most Unixes
            self.map.madvise(advice)


def save(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write atomically (a crash leaves no half-written cache; a server serving from the
    previous file keeps its map of the old inode)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)


def load(path: Path) -> Mapped | None:
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
            # ACCESS_COPY: a writable buffer for torch (nothing writes to it) that can never
            # write to the file.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(data, dtype=torch.uint8)
        state = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + size + o for o in info["data_offsets"])
            if not 8 + size <= start <= end <= len(data):
                raise ValueError(f"{name}'s data lies outside the file")
            dtype = DTYPES[info["dtype"]]
            chunk = raw[start:end]
            # int8 stays a view of the map; other dtypes are copied so that their alignment
            # does not matter.
            t = chunk.view(dtype) if dtype.itemsize == 1 else chunk.clone().view(dtype)
            state[name] = t.view(info["shape"])
        return Mapped(state, data)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("int8 cache %s is unreadable (%s): rebuilding it", path, exc)
        return None
