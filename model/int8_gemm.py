"""int8 weights x dynamically quantised int8 activations, int32 accumulation, on CPUs.

Weights: symmetric per output channel, w ~ q_w * s_w[n], q_w in [-127, 127]. Activations:
symmetric per token (row), quantised on every call, x ~ q_x * s_x[t]. The product is exact in
integers, y[t, n] = s_x[t] s_w[n] sum_k q_x[t, k] q_w[n, k], through oneDNN's u8 x s8 GEMM
(q_x + zero point as u8: the VNNI instruction multiplies u8 by s8).

One 8-bit pass over the activations costs the default model 4-5% perplexity (Gemma's RMSNorm
weights reach 300 and make outlier channels), so the projections take two passes: the
residual x - q_x s_x, at most half a step, is quantised again on a grid 2 * qmax = 254 times
finer, and both go through one GEMM as stacked rows (the weights are read once):
    x ~ s_x (q_hi + q_lo / 254)
That leaves the weights' rounding as the only real error (RESULTS.md). The LM head
(`Int8Head`) takes one pass over the whole vocabulary and the second only for each row's
highest logits.

Per-token scales make each GEMM row independent of the other rows in the batch, and the
integer accumulation is exact whatever the blocking: a row's result is bit-identical alone or
in a crowd. The attention's rounding still varies with the batch (fp32: ~1e-7), and the
activation rounding carries that on, layer after layer: on the default model a token's logprob
differs by up to ~0.06 alone vs in a crowd (the largest over 12 prompts x 32 tokens; fp32
weights: ~1e-6); greedy tokens differ only where two candidates are that close.

Error bound per output element, rounding to nearest (`quantisation_bound` computes it):
    |y - x.w| <= (s_w / 2) ||x||_1 + e_x ||w||_1 + k e_x s_w / 2
with e_x = s_x / 2 for one pass and s_x / 254 for two (twice the rounding, for safety).

CPUs without VNNI multiply u8 by s8 through 16-bit pair sums that saturate past 32767, so
there activations use 7 bits (q in [-63, 63], zero point 64): 127 * 127 * 2 < 32768.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_QMAX = 127


def available() -> bool:
    """Whether this torch build has oneDNN's quantised linear (x86 CPUs)."""
    ops = torch.ops.onednn
    return hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise")


def has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 without 16-bit saturation (AVX-512 or AVX VNNI)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return False
    flags = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def kernels(vnni: bool) -> str:
    """What the int8 projections run, for logs and benchmark records: oneDNN's u8 x s8 GEMM
    (8-bit activations with VNNI, 7-bit without) and, with VNNI, torch._int_mm for one row."""
    return "onednn-w8a8 + int_mm one-row" if vnni else "onednn-w8a7"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, k] (float) -> (q int8 [rows, k], fp32 scale [rows]), symmetric per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / WEIGHT_QMAX
    q = torch.round(w / scale[:, None]).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return q, scale


class ActivationQuantizer:
    """Per-token symmetric quantisation of activations to u8 with a zero point."""

    def __init__(self, vnni: bool) -> None:
        self.qmax = 127 if vnni else 63
        self.zero = 128 if vnni else 64
        self.grid = 2 * self.qmax  # second-pass steps per first-pass step: |residual| <= s / 2

    def __call__(self, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, k] fp32 -> (u8 rows [passes * T, k], scale [T, 1]): the codes of `codes`
        plus the zero point, what oneDNN's u8 x s8 GEMM takes."""
        q, scale = self.codes(x, passes)
        # The zero point added in 8 bits: int8 -> uint8 bits, + zero (mod 256) is q + zero for
        # q in [-qmax, qmax]; an fp32 add would be another pass over 4-byte values.
        return q.view(torch.uint8).add_(self.zero), scale

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's first-pass step, max |x| / qmax [T, 1]."""
        # linalg.vector_norm(inf) does not vectorise (15-20x slower); abs() writes a copy that
        # amax reads back, so many rows take amax and amin (two reads).
        if x.shape[0] > 16:
            scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
        else:
            scale = x.abs().amax(dim=1, keepdim=True)
        # Floored after the division: 1 / scale stays finite (an all-zero row codes as zeros).
        return scale.div_(self.qmax).clamp_(min=torch.finfo(torch.float32).tiny)

    def codes(self, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, k] fp32 -> (int8 codes [passes * T, k] in [-qmax, qmax], scale [T, 1]): the
        first pass, then the residual on the finer grid (module docstring). Few ops and few
        passes over memory, written in place into one buffer: a decode step runs this for
        every projection, a prefill chunk over [1024, 2048]-sized activations (it was 14% of a
        prefill step).

        No clamps: |x| / scale <= qmax, and |y - round(y)| <= 1/2 makes the residual's steps
        at most grid / 2 = qmax (both exact in fp32: y - round(y) is computed exactly).
        """
        t = x.shape[0]
        scale = self.scale(x)
        buf = torch.empty((passes * t, x.shape[1]), dtype=torch.float32, device=x.device)
        hi, y = buf[:t], buf[t:] if passes == 2 else buf
        torch.mul(x, scale.reciprocal(), out=y)
        if passes == 2:
            torch.round(y, out=hi)
            y.sub_(hi).mul_(self.grid)
        y.round_()
        return buf.to(torch.int8), scale

    def row_codes(self, x: torch.Tensor, passes: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x [1, k] fp32 -> (one int8 code row [1, k] per pass, scale [1, 1]): the rows of
        `codes` (the same operations, so the same values) as separate tensors, as the one-row
        GEMM takes them. Separate, not slices of one buffer: inductor (model/compiled_layers.py)
        hands torch._int_mm wrong data for a row sliced out of a buffer it computed."""
        scale = self.scale(x)
        y = x * scale.reciprocal()
        if passes == 1:
            return [y.round_().to(torch.int8)], scale
        hi = torch.round(y)
        lo = y.sub_(hi).mul_(self.grid).round_()
        return [hi.to(torch.int8), lo.to(torch.int8)], scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, passes: int) -> torch.Tensor:
        """What the GEMM sees: the activations as the int8 rows represent them."""
        t = scale.shape[0]
        x = (q[:t].double() - self.zero) * scale.double()
        if passes == 2:
            x += (q[t:].double() - self.zero) * scale.double() / self.grid
        return x


def quantisation_bound(
    x: torch.Tensor, w: torch.Tensor, passes: int, vnni: bool = True
) -> torch.Tensor:
    """The worst-case |int8 result - x @ w.T| per element (module docstring)."""
    _, s_w = quantize_rows(w)
    quantizer = ActivationQuantizer(vnni)
    _, s_x = quantizer(x.float(), 1)
    e_x = s_x / 2 if passes == 1 else s_x / quantizer.grid
    k = x.shape[1]
    return (
        s_w[None, :] / 2 * x.abs().sum(1, keepdim=True)
        + e_x * w.abs().sum(1)[None, :]
        + k * e_x * s_w[None, :] / 2
    )


class Int8Linear(torch.nn.Module):
    """A bias-free linear layer with int8 weights and per-token int8 activations.

    passes 2 quantises each activation row twice (value and residual), 1 once.

    Rows go through oneDNN's GEMM over its packed copy of the weights, except a single row (a
    decode step of one sequence), which goes through torch._int_mm over the plain int8 weights
    (`rows`, kept as the [in, out] operand `_int_mm` takes), once per pass: oneDNN's
    matrix-vector path without qlinear's per-call set-up (qlinear ~36 / 25 / 106 / 55 us
    against 12 / 9 / 90 / 29 us on the default model's four projections, one row). The integer
    sums are exact either way and are scaled by the same fp32 operations, so a row's result is
    bit-identical alone or in a batch. Only with VNNI (8-bit codes), where both GEMMs' u8 x s8
    products cannot saturate; the plain weights cost the default model 101 MB beside the
    packed copy.
    """

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, passes: int = 2, vnni: bool | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.passes = passes
        self.quantizer = ActivationQuantizer(has_vnni() if vnni is None else vnni)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.scale = scale.float().contiguous()
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        # The plain int8 weights as the one-row GEMM's [in, out] operand (a view of q).
        self.rows = q.t() if self.quantizer.qmax == 127 else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, passes: int = 2) -> Int8Linear:
        return cls(*quantize_rows(weight), passes)

    def gemm(self, q: torch.Tensor) -> torch.Tensor:
        """u8 activation rows (with the quantiser's zero point) -> their sums x the weights'
        scales, fp32 [rows, out]."""
        return torch.ops.onednn.qlinear_pointwise(
            q, 1.0, self.quantizer.zero, self.packed, self.scale, self.zero_points,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32:  # the model passes [T, in] fp32 rows
            y = self(x.reshape(-1, self.in_features).float())
            return y.reshape(*x.shape[:-1], self.out_features)
        t = x.shape[0]
        if t == 1 and self.rows is not None:
            return self.one_row(x)
        q, s_x = self.quantizer(x, self.passes)
        y = self.gemm(q)
        if self.passes == 2:
            y = y[:t].add_(y[t:], alpha=1.0 / self.quantizer.grid)
        return y.mul_(s_x)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """forward of one fp32 row [1, in] through torch._int_mm, pass by pass (class
        docstring): the same sums, scaled as oneDNN scales them (int32 -> fp32, x the weights'
        scales), combined as forward combines them."""
        assert self.rows is not None
        codes, s_x = self.quantizer.row_codes(x, self.passes)
        y = torch._int_mm(codes[0], self.rows).float().mul_(self.scale)
        if self.passes == 2:
            lo = torch._int_mm(codes[1], self.rows).float().mul_(self.scale)
            y.add_(lo, alpha=1.0 / self.quantizer.grid)
        return y.mul_(s_x)


class Int8Embedding(torch.nn.Module):
    """An embedding table stored as int8 rows with a scale each; lookups return fp32 rows."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.q, self.scale = q, scale.float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float().mul_(self.scale[ids, None])


def top_candidates(y: torch.Tensor, k: int, block: int = 128) -> torch.Tensor:
    """The column indices of each row's k highest values (unordered) of y [t, v], as topk
    gives them, in a fraction of its time over a vocabulary-wide row (1 row of 262,144:
    ~40 us against ~260 us; 32 rows: ~0.8 ms against ~3.2 ms).

    Blocks of `block` columns are ranked by their maximum, and topk runs over the k best
    blocks only: each of the row's k highest values lies in a block whose maximum is at least
    the k-th value, and at most k blocks have one (each holds one of those values), so the k
    best blocks hold them all. Where values tie at the k-th, either choice is a top k.
    """
    t, v = y.shape
    if v % block or v < 4 * k * block:
        return y.topk(k, dim=1, sorted=False).indices
    best = y.unflatten(1, (v // block, block)).amax(2).topk(k, dim=1, sorted=False).indices
    columns = best.mul_(block).unsqueeze(2) + torch.arange(block, device=y.device)
    columns = columns.view(t, k * block)
    return columns.gather(1, y.gather(1, columns).topk(k, dim=1, sorted=False).indices)


class Int8Head(torch.nn.Module):
    """The LM head: one activation pass over the whole vocabulary, the second pass only for
    each row's `refine` highest logits.

    The head is the step's largest GEMM (262,144 x 640 on the default model); a second pass
    over all of it doubles its rows and, at 32 rows, more than doubles its time (its output
    alone is 67 MB). One pass is accurate enough for the tail of the distribution (perplexity:
    RESULTS.md), but it is coarse where the final norm makes outlier channels (its scale
    reaches 301 on the default model), and a value within fp32 noise of a rounding boundary
    moves a logit by ~0.01, enough to swap greedy near-ties between batch shapes. So the
    residual pass is computed for each row's top `refine` candidates, from the int8 rows of
    those tokens: their logits come out as the two-pass head's (the same integer sums, scaled
    the same way), and the argmax, the top logprobs and every near-tie are decided at two-pass
    precision.

    `q` is kept as plain int8 rows for the candidates (the packed copy is oneDNN's opaque
    layout) and, with VNNI, for a single row's first pass (`torch._int_mm`, as
    `Int8Linear.one_row`); a tied head passes the embedding's table, so the rows are stored
    once.
    """

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, refine: int = 32, vnni: bool | None = None
    ) -> None:
        super().__init__()
        self.linear = Int8Linear(q, scale, passes=1, vnni=vnni)
        self.q, self.scale = q, self.linear.scale
        self.refine = min(refine, q.shape[0])
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.linear.quantizer
        x = x.reshape(-1, self.in_features).float()
        t = x.shape[0]
        plain = self.linear.rows
        if t == 1 and plain is not None:
            # One row (a single decoding sequence): torch._int_mm over the plain rows, as
            # Int8Linear.one_row does: the same sums scaled the same way, bit for bit, and
            # oneDNN's matrix-vector path reads the 262,144 x 640 rows faster than qlinear
            # reads its packed copy (the head 5.29 -> 5.01 ms, RESULTS.md).
            codes, s_x = quantizer.codes(x, 2)
            y = torch._int_mm(codes[:1], plain).float().mul_(self.scale)
            lo = codes[1:].double()
        else:
            q, s_x = quantizer(x, 2)
            y = self.linear.gemm(q[:t])
            lo = q[t:].double().sub_(quantizer.zero)  # [t, k]
        top = top_candidates(y, self.refine)  # [t, refine]
        # The residual rows' integer sums with the candidates' rows, exact in fp64, then
        # converted and scaled in fp32 as oneDNN does with its int32 sums.
        rows = self.q[top.reshape(-1)].view(t, self.refine, self.in_features).double()
        acc_lo = torch.bmm(rows, lo[:, :, None]).squeeze(2).float()
        y_lo = acc_lo.mul_(self.scale[top])
        y.scatter_(1, top, y.gather(1, top).add_(y_lo, alpha=1.0 / quantizer.grid))
        return y.mul_(s_x)
