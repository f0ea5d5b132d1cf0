"""Read safetensors tensors straight into preallocated storage, in bounded chunks.

No mmap and no whole-tensor temporaries: a tensor whose dtype matches its destination is read
with readinto directly into the destination's memory; otherwise it passes through a chunk
buffer of at most CHUNK_BYTES and is converted there. Peak memory stays at one copy of the
weights plus one chunk.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch

CHUNK_BYTES = 64 << 20
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(f: BinaryIO, path: Path) -> list[TensorEntry]:
    """The tensors of an open safetensors file; ValueError naming the file if malformed."""
    try:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
            entries.append(
                TensorEntry(
                    name, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + start, end - start
                )
            )
        return entries
    except (struct.error, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def iter_entries(path: Path) -> Iterator[tuple[BinaryIO, TensorEntry]]:
    with open(path, "rb") as f:
        for entry in read_header(f, path):
            yield f, entry


def read_into(f: BinaryIO, entry: TensorEntry, dst: torch.Tensor) -> None:
    """Fill dst (same shape as the entry) with the tensor's values, converting its dtype."""
    f.seek(entry.offset)
    if dst.dtype == entry.dtype and dst.device.type == "cpu" and dst.is_contiguous():
        view = memoryview(dst.view(-1).view(torch.uint8).numpy())
        if f.readinto(view) != entry.nbytes:
            raise ValueError(f"tensor {entry.name}: file truncated")
        return
    flat = dst.view(-1)  # destinations are row ranges of contiguous parameters
    item = torch.tensor([], dtype=entry.dtype).element_size()
    per_chunk = max(1, CHUNK_BYTES // item)
    for start in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - start)
        raw = bytearray(n * item)
        if f.readinto(raw) != len(raw):
            raise ValueError(f"tensor {entry.name}: file truncated")
        flat[start : start + n].copy_(torch.frombuffer(raw, dtype=entry.dtype))


def read_window(f: BinaryIO, entry: TensorEntry, dst: torch.Tensor, row: int, col: int) -> None:
    """Fill dst [r, c] (or [r] for 1-D tensors) with the entry's rows row..row+r-1 and columns
    col..col+c-1: one tensor-parallel rank's slice, read without the rest of the tensor
    (whole rows: one contiguous read; a column range: rows in bounded chunks)."""
    width = entry.shape[1] if len(entry.shape) > 1 else 1
    item = entry.dtype.itemsize
    row_bytes = width * item
    if dst.dim() < 2 or dst.shape[1] == width:  # whole rows (or all): contiguous bytes
        part = replace(
            entry,
            shape=tuple(dst.shape),
            offset=entry.offset + row * row_bytes,
            nbytes=dst.numel() * item,
        )
        read_into(f, part, dst)
        return
    per_chunk = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, dst.shape[0], per_chunk):
        n = min(per_chunk, dst.shape[0] - start)
        f.seek(entry.offset + (row + start) * row_bytes)
        raw = bytearray(n * row_bytes)
        if f.readinto(raw) != len(raw):
            raise ValueError(f"tensor {entry.name}: file truncated")
        rows = torch.frombuffer(raw, dtype=entry.dtype).view(n, width)
        dst[start : start + n].copy_(rows[:, col : col + dst.shape[1]])
