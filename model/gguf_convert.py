"""Convert a GGUF file into a Hugging Face directory, once: cached by the file's sha256.

The directory holds config.json, model.safetensors and tokenizer.model, which the ordinary
safetensors loader serves. Tensors are streamed into the safetensors file a slice at a time,
so converting needs about one slice of memory, not one model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from gemma_serve.model.gguf import (
    GGUFFile,
    hf_config,
    hf_tensor_name,
    iter_rows,
    norm_shift,
    read_gguf,
)
from gemma_serve.model.gguf_tokenizer import sentencepiece_model
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize
from tqdm import tqdm

CACHE_ENV = "GEMMA_SERVE_CACHE"
# Part of every cache key: bump it when the conversion's output changes, so that stale
# directories from an older converter are never served.
CONVERTER_VERSION = 1
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
STALE_TEMP_S = 3600.0  # an unfinished conversion this old belongs to a crashed process


def cache_root() -> Path:
    """Where converted models live: $GEMMA_SERVE_CACHE, else ~/.cache/gemma-serve."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma-serve"


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: bool = True, *, dtype: str = "float32"
) -> Path:
    """Write out_dir/{config.json, model.safetensors, tokenizer.model} from a GGUF file.

    Weights are dequantized to dtype (float32, the CPU serving dtype, by default), renamed to
    Hugging Face names, and Gemma's norm weights get llama.cpp's +1 taken off again.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gguf = read_gguf(gguf_path)
    config = hf_config(gguf) | {"torch_dtype": dtype}
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_model(gguf.metadata).SerializeToString()
    (out_dir / "tokenizer.model").write_bytes(tokenizer)
    _write_safetensors(gguf, out_dir / "model.safetensors", dtype, progress)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _write_safetensors(gguf: GGUFFile, path: Path, dtype: str, progress: bool) -> None:
    """Stream every tensor into one safetensors file: header first (all sizes are known from
    the GGUF directory), then the data slice by slice."""
    itemsize = np.dtype(np.float16 if dtype != "float32" else np.float32).itemsize
    header: dict[str, object] = {"__metadata__": {"format": "pt", "source": gguf.path.name}}
    offset = 0
    for t in gguf.tensors:
        size = int(np.prod(t.shape)) * itemsize
        entry = {
            "dtype": DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        header[hf_tensor_name(t.name)] = entry
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as safetensors itself writes
    bar = tqdm(
        total=offset, unit="B", unit_scale=True, desc=f"Converting {gguf.path.name}",
        disable=not progress,
    )  # fmt: skip
    with path.open("wb") as f, bar:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in gguf.tensors:
            shift = norm_shift(t.name)
            for rows in iter_rows(gguf.path, t):
                data = _cast(rows + shift if shift else rows, dtype)
                f.write(data)
                bar.update(len(data))


def _cast(rows: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":  # numpy has no bfloat16: gguf rounds to nearest even like torch
        return quantize(rows, GGMLQuantizationType.BF16).tobytes()
    return rows.astype(np.float16 if dtype == "float16" else np.float32, copy=False).tobytes()


def cached_conversion(
    gguf_path: Path,
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    sha256: str | None = None,
    dtype: str = "float32",
) -> Path:
    """The converted directory of a GGUF file, converting it on first use.

    Keyed by the file's sha256 (pass sha256 when it is already known, to skip hashing), the
    dtype and the converter version. The conversion is written to a temporary directory and
    renamed into place, so a crash never leaves a half-written cache entry.
    """
    root = (cache_dir if cache_dir is not None else cache_root()) / "converted"
    digest = sha256 or file_sha256(gguf_path)
    final = root / f"{digest}-{dtype}-v{CONVERTER_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        convert_gguf(gguf_path, tmp, progress, dtype=dtype)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        # Another process finished the same conversion first; its result is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temps(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass
