"""Helpers for the tensor-parallel tests: tiny checkpoints of other shapes, and processes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from tests.model_helpers import make_gemma3
from tests.tokenizer_helpers import train_tiny_tokenizer


def tiny_gemma3_checkpoint(path: Path, **overrides: Any) -> Path:
    """A tiny Gemma 3 (text) directory with the test tokenizer (built beside a Gemma 2 one)."""
    path.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(path / "tokenizer.model")
    make_gemma3(path, **overrides)
    return path


def truncate_last_tensor(src: Path, dst: Path, last: str, cut: int) -> Path:
    """A copy of a checkpoint whose safetensors file lists `last` at its end and lacks its
    final `cut` bytes: only a reader of the tensor's tail meets the truncation."""
    shutil.copytree(src, dst)
    data = (src / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    names = sorted(header, key=lambda n: (n == last, n))
    body = bytearray()
    for name in names:
        start, end = header[name]["data_offsets"]
        chunk = data[8 + size + start : 8 + size + end]
        header[name]["data_offsets"] = [len(body), len(body) + len(chunk)]
        body += chunk
    raw = json.dumps(header).encode()
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body[:-cut])
    return dst


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive (zombies count as gone) after waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
