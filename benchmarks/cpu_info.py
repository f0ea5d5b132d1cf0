"""The CPU a benchmark ran on: model name, core count and the SIMD flags that pick kernels."""

from __future__ import annotations

import os
from pathlib import Path

# The flags that decide which GEMM kernels oneDNN and llama.cpp run.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "amx_bf16")  # fmt: skip


def cpu_summary() -> dict:
    """{"model", "cores", "flags"} from /proc/cpuinfo (Linux); empty fields elsewhere."""
    model, flags = "", set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


if __name__ == "__main__":
    print(cpu_summary())
