"""GGUF files (llama.cpp) read as a Hugging Face Gemma 2 / Gemma 3 checkpoint (torch-free).

The header and metadata are parsed here with struct + numpy: gguf.GGUFReader builds a Python
object per element of every array, which costs ~20 s for Gemma 3's 262,144-entry vocabulary.
Tensor data is memory-mapped and dequantized a slice of rows at a time by gguf.quants, so peak
memory stays near one slice, not one model.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as gguf_dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHS = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}
CHUNK_BYTES = 32 << 20  # fp32 bytes per dequantized slice

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
# Per-layer GGUF names (llama.cpp's gguf-py tensor_mapping for gemma2/gemma3) -> HF names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Values every Gemma 2/3 text checkpoint has; the GGUF does not carry them.
_FIXED = {
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_act": "gelu_pytorch_tanh",  # the transformers 4.4x Gemma 2 spelling
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_bidirectional_attention": False,
    "torch_dtype": "float32",
}
# Gemma 27B models scale attention by hidden/heads, not head_dim; llama.cpp, which writes no key
# for it, recognises them by their layer count (gemma_pytorch config.py does the same).
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class GGUFError(ValueError):
    """A GGUF file this converter cannot read or map to a Hugging Face checkpoint."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's place in the file. shape is torch order (GGUF's ne[] reversed)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    """The metadata and tensor directory of a GGUF file (tensor data stays on disk)."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[GGUFValueType(vtype)]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        # Kept float32 so that it prints as written (1e-06, not 9.999999974752427e-07).
        return np.float32(value) if vtype == GGUFValueType.FLOAT32 else value

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start, self.pos = self.pos + 8, self.pos + 8 + n
        return self.buf[start : self.pos].decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(vtype)
        etype, count = self.scalar(GGUFValueType.UINT32), self.scalar(GGUFValueType.UINT64)
        if etype in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            return [self.value(etype) for _ in range(count)]
        # Numeric arrays (scores, token types) come out as one numpy copy, not count objects.
        dtype = np.dtype(_SCALARS[GGUFValueType(etype)].replace("?", "u1"))
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return arr.astype(bool) if etype == GGUFValueType.BOOL else arr


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor directory of a little-endian GGUF v2/v3 file."""
    path = Path(path)
    if path.stat().st_size < 24:  # magic, version and the two counts
        raise GGUFError(f"{path} is too short to be a GGUF file")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (magic {buf[:4]!r})")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.scalar(GGUFValueType.UINT32)
        if version not in (2, 3):  # a byte-swapped (big-endian) file reads as a huge version
            raise GGUFError(f"{path}: unsupported GGUF version {version} (need 2 or 3, LE)")
        n_tensors, n_kv = cur.scalar(GGUFValueType.UINT64), cur.scalar(GGUFValueType.UINT64)
        metadata: dict[str, Any] = {}
        try:
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.scalar(GGUFValueType.UINT32))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                ne = [cur.scalar(GGUFValueType.UINT64) for _ in range(cur.scalar(4))]
                infos.append((name, ne, cur.scalar(4), cur.scalar(GGUFValueType.UINT64)))
        except (struct.error, ValueError, KeyError) as e:
            raise GGUFError(f"{path}: corrupt GGUF header ({e})") from None
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // align) * align
        tensors = tuple(_tensor(name, ne, t, data_start + off) for name, ne, t, off in infos)
        end = max((t.offset + t.n_bytes for t in tensors), default=data_start)
        if end > len(buf):
            raise GGUFError(f"{path} is truncated: tensor data ends at {end}, file is {len(buf)}")
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _tensor(name: str, ne: list[int], qtype: int, offset: int) -> GGUFTensor:
    try:
        qt = GGMLQuantizationType(qtype)
    except ValueError:
        raise GGUFError(f"tensor {name}: unknown ggml type {qtype}") from None
    block, type_size = GGML_QUANT_SIZES[qt]
    if ne[0] % block:
        raise GGUFError(f"tensor {name}: row of {ne[0]} is not a multiple of {qt.name} blocks")
    n_bytes = int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * type_size
    return GGUFTensor(name, tuple(reversed(ne)), qt, offset, n_bytes)


def iter_rows(
    path: Path, tensor: GGUFTensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[np.ndarray]:
    """Yield the tensor dequantized to float32 as (rows, shape[-1]) slices, in order."""
    row_elems = tensor.shape[-1]
    n_rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))  # 1 for a vector
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
    raw = raw.reshape(n_rows, -1)
    step = max(1, chunk_bytes // (4 * row_elems))
    step -= step % 64 if step >= 64 else 0  # whole groups for dequantize() to fuse
    for start in range(0, n_rows, step):
        yield dequantize(raw[start : start + step], tensor.qtype)


def dequantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Raw bytes (rows, bytes_per_row) -> float32 (rows, elements_per_row)."""
    n, row_bytes = rows.shape
    # Blocks never straddle rows, so several rows can be fused into one long row: gguf.quants
    # loops in Python over groups of 16 rows, and longer rows make that loop 2-3x cheaper.
    fuse = next(m for m in (64, 32, 16, 8, 4, 2, 1) if n % m == 0)
    try:
        out = gguf_dequantize(
            np.ascontiguousarray(rows).reshape(n // fuse, fuse * row_bytes), qtype
        )
    except NotImplementedError:
        raise GGUFError(f"cannot dequantize ggml type {qtype.name}") from None
    return np.asarray(out, dtype=np.float32).reshape(n, -1)


def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of a gemma2/gemma3 GGUF tensor (blk.3.attn_q.weight -> ...)."""
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise GGUFError(f"no Hugging Face name for GGUF tensor {name!r}")


def norm_shift(name: str) -> float:
    """What to add to a tensor to undo llama.cpp's conversion.

    HF Gemma RMSNorm scales by (1 + w); llama.cpp's convert_hf_to_gguf stores w + 1 for every
    tensor whose name ends in norm.weight (q_norm/k_norm included), so its kernel multiplies by w.
    """
    return -1.0 if name.endswith("norm.weight") else 0.0


def hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config.json of a gemma2/gemma3 GGUF (transformers 4.x/5.x keys)."""
    arch, meta = gguf.arch, gguf.metadata
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"architecture {arch!r} not supported (supported: {sorted(SUPPORTED_ARCHS)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{gguf.path}: metadata lacks {arch}.{key}")
        return float(str(value)) if isinstance(value, np.floating) else value

    hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length", hidden // heads)
    if f"{arch}.attention.scale" in meta:
        scalar = get("attention.scale") ** -2.0
    else:
        scalar = hidden // heads if layers == _27B_LAYERS[arch] else head_dim
    embed = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    config = {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": embed.shape[0] if embed else len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "sliding_window": get("attention.sliding_window", 4096),
        "layer_types": _layer_types(arch, layers, pattern),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in gguf.tensors),
        **_special_ids(meta),
        **_FIXED,
    }
    if arch == "gemma2":
        return config | {
            "rope_theta": get("rope.freq_base", 10000.0),
            "attn_logit_softcapping": get("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": get("final_logit_softcapping", 30.0),
        }
    scaling = None  # Gemma 3 4B-27B stretch the global layers' RoPE 8x
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    return config | {
        "rope_theta": get("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": get("rope.freq_base_swa", 10000.0),
        "rope_scaling": scaling,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def _special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    eos = [int(meta.get("tokenizer.ggml.eos_token_id", 1))]
    eot = meta.get("tokenizer.ggml.eot_token_id")  # <end_of_turn> in instruction-tuned files
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    return {
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    }


def _layer_types(arch: str, layers: int, pattern: Any) -> list[str]:
    """Sliding/full per layer: an explicit per-layer bool array (True = sliding), a period N
    (layer i is full when (i + 1) % N == 0), or the architecture's fixed pattern."""
    if isinstance(pattern, np.ndarray) and pattern.dtype == bool and len(pattern) == layers:
        return ["sliding_attention" if s else "full_attention" for s in pattern]
    period = (
        int(pattern) if isinstance(pattern, (int, np.integer)) else (2 if arch == "gemma2" else 6)
    )
    return [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)
    ]
