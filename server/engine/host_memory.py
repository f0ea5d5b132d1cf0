"""How much host memory this process may still take: the tighter of the machine's
MemAvailable and the cgroup's limit (a container's --memory). Torch-free.

Used before the KV cache is allocated on CPU: the cache is zeroed at start-up, so an
allocation that cannot be backed would otherwise end in the kernel's OOM killer, not in an
error that names the flag to lower.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_UNLIMITED = 1 << 62


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def mem_available(meminfo: str) -> int | None:
    """MemAvailable from a /proc/meminfo text, in bytes."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cgroup_headroom(root: Path) -> int | None:
    """Bytes left under this process's cgroup limit (v2 memory.max, else v1), None if none."""
    pairs = (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))
    for limit_name, usage_name in pairs:
        limit, usage = _read(root / limit_name), _read(root / usage_name)
        if limit is None or usage is None:
            continue
        limit = limit.strip()
        if limit == "max" or int(limit) >= _UNLIMITED:
            return None
        return max(0, int(limit) - int(usage.strip()))
    return None


def available_bytes(
    proc: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """What the process may still allocate, None where neither source can be read."""
    meminfo = _read(proc)
    sources = (mem_available(meminfo) if meminfo else None, cgroup_headroom(cgroup))
    found = [v for v in sources if v is not None]
    return min(found) if found else None


# glibc's mallopt parameters (malloc.h) and the values the engine sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory for the next step instead of handing it back to the OS
    (mallopt); False where there is no such call (another libc).

    A CPU forward allocates and frees the same large temporaries every step (gathered keys and
    values, GEMM outputs, logits). With glibc's defaults, blocks past its mmap threshold are
    mapped and unmapped each time and the top of the heap is trimmed whenever free space
    passes twice that threshold, so the next step takes every page again as a fresh,
    zero-filled page fault: 16,000 faults in a 32-row decode step of the default model,
    a fifth of its time (benchmarks/RESULTS.md). Fixed thresholds keep those pages in the
    heap; `release_free_memory` still returns them when the engine goes idle.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_TOP_PAD, _TOP_PAD),
    ):
        if not mallopt(param, value):
            return False
    return True


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the OS (glibc's malloc_trim); False where
    there is no such call (another libc).

    glibc keeps freed blocks below its dynamic mmap threshold (which rises to 32 MiB after the
    first large free) in its heaps, so every new batch shape raises RSS a little for good. The
    engine calls this when it goes idle, where it costs no step any time.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


# oneDNN's primitive cache: compiled GEMMs kept (its default: 1,024).
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_cache() -> None:
    """Cap oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY; the environment wins).

    oneDNN keeps a compiled primitive per GEMM shape, and a batch's row count is part of the
    shape, so every batch size and prefill chunk adds one per projection (~0.1-0.35 MB each
    on the default model): with the default 1,024, RSS climbs for hundreds of requests
    (docs/RELIABILITY.md, "Memory"). 64 holds a dozen steps' shapes (about five a step); a
    miss costs ~0.4 ms of primitive creation. oneDNN reads the variable when it creates its
    first primitive, so the CLI calls this first thing and the engine before loading (packing
    creates some); in a process that ran a oneDNN GEMM before, it changes nothing.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
