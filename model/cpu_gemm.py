"""fp32 GEMMs on CPUs through oneDNN, with each weight packed once at load.

torch's fp32 CPU matmul goes to MKL, which runs its AVX2 kernels on non-Intel x86 CPUs even where
AVX-512 is there. oneDNN picks its kernels by CPU features, and with the weight pre-packed into
its blocked layout it ran the decode-shaped products of the default model 2.5-4x faster than MKL
on a 2-core AVX-512 AMD EPYC (benchmarks/RESULTS.md). The arithmetic stays fp32 in, fp32
accumulation, fp32 out: results differ from MKL's only in summation order (fp32 rounding noise).

Packing is an inference-only step: a packed weight is an opaque oneDNN tensor that only
`packed_linear` reads.
"""

from __future__ import annotations

import torch

# The batch size oneDNN tunes the packed layout for; any batch size works with it afterwards.
PACK_BATCH_HINT = 64


def available() -> bool:
    """Whether this torch build has oneDNN and its packed linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def should_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Packing pays on CPUs in fp32 (bf16 matmuls already go to oneDNN)."""
    return device.type == "cpu" and dtype == torch.float32 and available()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] (fp32, CPU) -> oneDNN's packed layout for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight^T -> [T, out], with `packed` from `pack(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedLinear(torch.nn.Module):
    """A bias-free fp32 linear layer over a packed weight; the plain weight is not kept."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = pack(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed)
