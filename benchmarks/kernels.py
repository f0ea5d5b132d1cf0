"""GPU benchmark of the Triton attention kernels at Gemma 2 shapes (bf16).

Prefill (packed 4 x 2048 tokens, soft-cap 50, window 4096 and global) is compared with torch's
compiled flex_attention (tanh score_mod, causal/sliding-window document block mask) in TFLOP/s
of useful (unmasked) work; decode (batch 64 x 4096 context, paged, block 16) is reported in GB/s
of K/V read against a measured device-to-device copy bandwidth; store_kv in GB/s moved.
Every kernel is first checked against the torch reference at the benchmarked shape.

    python benchmarks/kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

# Run as a script, sys.path[0] is benchmarks/ and `import kernels` would find this very file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"gemma2-9b": (16, 8, 256), "gemma2-27b": (32, 16, 128)}  # (Hq, Hkv, head_dim)
SOFTCAP = 50.0


def _bench(fn, rep_ms: int) -> float:
    """Median milliseconds of fn()."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def copy_bandwidth(rep_ms: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffers."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep_ms)
    return 2 * src.numel() / ms / 1e6


def bench_prefill(name: str, window: int | None, args: argparse.Namespace) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kernels import reference, triton_ops
    from kernels.prefill_attention import prefill_flops

    hq, hkv, d = SHAPES[name]
    lens = [args.prefill_len] * args.prefill_seqs
    t, scale = sum(lens), d**-0.5
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], device="cuda")
    cu = cu.to(torch.int32)
    kw = dict(block_size=16, ring_blocks=0, window=window, softcap=SOFTCAP, scale=scale)
    ops_args = (q, k, v, cu, None, None, None, None)
    out = triton_ops.prefill_attention(*ops_args, **kw)
    err = _max_err(out, reference.prefill_attention(*ops_args, **kw))
    flops = prefill_flops(lens, hq, d, window)
    ms = _bench(lambda: triton_ops.prefill_attention(*ops_args, **kw), args.rep_ms)
    row = {"op": "prefill", "model": name, "window": window, "tokens": t, "triton_ms": ms,
           "triton_tflops": flops / ms / 1e9, "max_rel_err": err}  # fmt: skip
    if args.no_flex:
        return {**row, "flex_error": "skipped"}

    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens).cuda())
    win = window if window is not None else t + 1

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki < win)

    def score_mod(score, b, h, qi, ki):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    try:
        block_mask = create_block_mask(mask_mod, None, None, t, t, device="cuda")
        flex = torch.compile(flex_attention)
        fq, fk, fv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))

        def run_flex():
            return flex(fq, fk, fv, score_mod=score_mod, block_mask=block_mask, scale=scale,
                        enable_gqa=True)  # fmt: skip

        fout = run_flex()[0].transpose(0, 1)
        fms = _bench(run_flex, args.rep_ms)
        row.update(flex_ms=fms, flex_tflops=flops / fms / 1e9, flex_vs_ref=_max_err(fout, out))
    except Exception as exc:  # flex may lack a kernel for a shape (e.g. D 256 shared memory)
        row.update(flex_error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return row


def bench_decode(name: str, window: int | None, bandwidth: float, args: argparse.Namespace):
    from kernels import reference, triton_ops

    hq, hkv, d = SHAPES[name]
    s, ctx, bs = args.decode_batch, args.decode_ctx, 16
    per_seq = math.ceil(ctx / bs)
    k_cache = torch.randn(s * per_seq * bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(s * per_seq, device="cuda", dtype=torch.int32).view(s, per_seq)
    lens = torch.full((s,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(s, hq, d, device="cuda", dtype=torch.bfloat16)
    kw = dict(block_size=bs, ring_blocks=0, window=window, softcap=SOFTCAP, scale=d**-0.5)
    dargs = (q, k_cache, v_cache, tables, lens)
    err = _max_err(
        triton_ops.decode_attention(*dargs, **kw), reference.decode_attention(*dargs, **kw)
    )
    ms = _bench(lambda: triton_ops.decode_attention(*dargs, **kw), args.rep_ms)
    visible = min(ctx, window) if window is not None else ctx
    kv_bytes = 2 * s * visible * hkv * d * k_cache.element_size()
    gbs = kv_bytes / ms / 1e6
    return {"op": "decode", "model": name, "window": window, "batch": s, "context": ctx,
            "triton_ms": ms, "gb_per_s": gbs, "pct_of_copy": 100 * gbs / bandwidth,
            "max_rel_err": err}  # fmt: skip


def bench_store(name: str, bandwidth: float, args: argparse.Namespace) -> dict:
    from kernels import triton_ops

    _, hkv, d = SHAPES[name]
    t = args.prefill_len * args.prefill_seqs
    k = torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_cache = torch.zeros(2 * t, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(2 * t, device="cuda")[:t]
    triton_ops.store_kv(k, v, k_cache, v_cache, slots)
    ok = bool(torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v))
    ms = _bench(lambda: triton_ops.store_kv(k, v, k_cache, v_cache, slots), args.rep_ms)
    gbs = 2 * 2 * k.numel() * k.element_size() / ms / 1e6  # k and v, read + written
    return {"op": "store_kv", "model": name, "tokens": t, "triton_ms": ms, "gb_per_s": gbs,
            "pct_of_copy": 100 * gbs / bandwidth, "exact": ok}  # fmt: skip


def _table(rows: list[dict]) -> str:
    lines = [f"{'op':9}{'model':12}{'window':>7}{'ms':>9}  result"]
    for r in rows:
        if r["op"] == "prefill":
            res = f"{r['triton_tflops']:.1f} TFLOP/s"
            res += (f" | flex {r['flex_tflops']:.1f} TFLOP/s" if "flex_tflops" in r
                    else f" | flex: {r.get('flex_error', '')[:60]}")  # fmt: skip
        else:
            res = f"{r['gb_per_s']:.0f} GB/s ({r['pct_of_copy']:.0f}% of copy)"
        err = f"  err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        win = str(r.get("window")) if r["op"] != "store_kv" else "-"
        lines.append(f"{r['op']:9}{r['model']:12}{win:>7}{r['triton_ms']:9.3f}  {res}{err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("kernel_bench.json"), help="JSON output")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--prefill-seqs", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--decode-ctx", type=int, default=4096)
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex_attention baseline")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py needs a CUDA GPU (none found); nothing to do.", file=sys.stderr
        )
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(args.rep_ms)
    rows: list[dict] = []
    for name in args.models:
        for window in (4096, None):
            rows.append(bench_prefill(name, window, args))
            print(_table(rows[-1:]).splitlines()[1], flush=True)
        rows.append(bench_decode(name, None, bandwidth, args))
        rows.append(bench_store(name, bandwidth, args))
    result = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": bandwidth, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}, copy bandwidth {bandwidth:.0f} GB/s")
    print(_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
