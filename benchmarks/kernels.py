"""Benchmark of the Triton attention kernels at Gemma 2 shapes (bf16), one GPU run.

Prefill (packed 2 x 8192 tokens, soft-cap 50, window 4096 and global) is compared with torch's
flex_attention (tanh score_mod, causal/sliding-window document block mask, compiled on CUDA) in
TFLOP/s of useful (unmasked) work; decode (batch 64 x 4096 context, paged, block 16) is reported
in GB/s of K/V read against a measured device-to-device copy bandwidth; store_kv in GB/s moved.
Besides the launch heuristics' choice ("default"), each op is timed at a few other tile configs
and split counts, so one run on a GPU says which to keep. Every timed config is first checked
against the torch reference at the benchmarked shape.

    python benchmarks/kernels.py --out results.json
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu --tiny   # smoke run, no GPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

# Run as a script, sys.path[0] is benchmarks/ and `import kernels` would find this very file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"gemma2-9b": (16, 8, 256), "gemma2-27b": (32, 16, 128)}  # (Hq, Hkv, head_dim)
SOFTCAP = 50.0
WINDOW = 4096
# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried besides triton_ops.prefill_config's choice.
PREFILL_VARIANTS = {
    128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(128, 16, 8, 2), (128, 16, 8, 3), (64, 32, 4, 2)],
}
# (BLOCK_N, num_splits, num_warps, num_stages) tried besides triton_ops' choice.
DECODE_VARIANTS = [
    (64, 1, 4, 2), (64, 4, 4, 2), (32, 2, 4, 2), (128, 2, 4, 2), (64, 2, 8, 2), (64, 2, 4, 3),
    (32, 2, 4, 4),
]  # fmt: skip


def _bench(fn, rep_ms: int, device: str) -> float:
    """Median milliseconds of fn(): CUDA events via do_bench on a GPU, wall clock on a CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere gives NaN (which fails every check)."""
    out, ref = out.float(), ref.float()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def copy_bandwidth(rep_ms: int, device: str) -> float:
    """Copy bandwidth in GB/s (bytes read + written): on a GPU gpu_report's measurement, the
    ceiling the serving roofline uses too; on a CPU (smoke runs) a 64 MiB copy."""
    if device == "cuda":
        from benchmarks.gpu_report import copy_bandwidth as device_copy

        return device_copy()["bandwidth_bytes_per_s"] / 1e9
    src = torch.randint(0, 255, (2**26,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep_ms, device)
    return 2 * src.numel() / ms / 1e6


def _prefill_rows(name: str, window: int | None, args: argparse.Namespace) -> list[dict]:
    from gemma_serve.kernels import reference, triton_ops
    from gemma_serve.kernels.prefill_attention import launch_prefill, prefill_flops

    dev, (hq, hkv, d) = args.device, SHAPES[name]
    lens = [args.prefill_len] * args.prefill_seqs
    t, scale = sum(lens), d**-0.5
    q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], device=dev)
    cu = cu.to(torch.int32)
    kw = dict(block_size=16, ring_blocks=0, window=window, softcap=SOFTCAP, scale=scale)
    ops_args = (q, k, v, cu, None, None, None, None)
    ref = reference.prefill_attention(*ops_args, **kw)
    flops = prefill_flops(lens, hq, d, window)
    base = {"op": "prefill", "model": name, "window": window, "tokens": t}
    default = triton_ops.prefill_config(d, triton_ops.interpreting())
    configs = [("default", None)] + [(f"m{m}n{n}w{w}s{s}", (m, n, w, s))
                                     for m, n, w, s in PREFILL_VARIANTS[d]]  # fmt: skip
    rows = []
    for label, cfg in configs:
        if cfg is None:
            run = lambda: triton_ops.prefill_attention(*ops_args, **kw)  # noqa: E731
            label = (f"default m{default.block_m}n{default.block_n}"
                     f"w{default.num_warps}s{default.num_stages}")  # fmt: skip
        else:
            m, n, w, s = cfg
            run = lambda m=m, n=n, w=w, s=s: launch_prefill(  # noqa: E731
                *ops_args, **kw, block_m=m, block_n=n, num_warps=w, num_stages=s,
                upcast=triton_ops.interpreting(),
            )  # fmt: skip
        row = {**base, "config": label}
        try:
            row["rel_err"] = _rel_err(run(), ref)
            ms = _bench(run, args.rep_ms, dev)
            row.update(ms=ms, tflops=flops / ms / 1e9)
        except Exception as exc:  # e.g. out of shared memory for one variant: record, go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    if not args.no_flex:
        rows.append(_flex_row(base, q, k, v, lens, window, scale, flops, ref, args))
    return rows


def _flex_row(
    base: dict,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lens: list[int],
    window: int | None,
    scale: float,
    flops: float,
    ref: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """torch's flex_attention at the same settings (compiled on CUDA, eager on a CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, t = args.device, q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens).to(dev))
    win = window if window is not None else t + 1

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki < win)

    def score_mod(score, b, h, qi, ki):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    row = {**base, "config": "flex_attention"}
    try:
        block_mask = create_block_mask(mask_mod, None, None, t, t, device=dev)
        flex = torch.compile(flex_attention) if dev == "cuda" else flex_attention
        fq, fk, fv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))

        def run_flex():
            return flex(fq, fk, fv, score_mod=score_mod, block_mask=block_mask, scale=scale,
                        enable_gqa=True)  # fmt: skip

        row["rel_err"] = _rel_err(run_flex()[0].transpose(0, 1), ref)
        ms = _bench(run_flex, args.rep_ms, dev)
        row.update(ms=ms, tflops=flops / ms / 1e9)
    except Exception as exc:  # flex may lack a kernel for a shape (e.g. D 256 shared memory)
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def _decode_rows(name: str, bandwidth: float, args: argparse.Namespace) -> list[dict]:
    from gemma_serve.kernels import reference, triton_ops
    from gemma_serve.kernels.decode_attention import launch_decode

    dev, (hq, hkv, d) = args.device, SHAPES[name]
    s, ctx, bs = args.decode_batch, args.decode_ctx, 16
    per_seq = math.ceil(ctx / bs)
    k_cache = torch.randn(s * per_seq * bs, hkv, d, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(s * per_seq, device=dev, dtype=torch.int32).view(s, per_seq)
    lens = torch.full((s,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(s, hq, d, device=dev, dtype=torch.bfloat16)
    kw = dict(block_size=bs, ring_blocks=0, window=None, softcap=SOFTCAP, scale=d**-0.5)
    dargs = (q, k_cache, v_cache, tables, lens)
    ref = reference.decode_attention(*dargs, **kw)
    kv_bytes = 2 * s * ctx * hkv * d * k_cache.element_size()
    interp = triton_ops.interpreting()
    block_n = triton_ops.decode_block_n(d, interp)
    splits = triton_ops.choose_num_splits(s, hkv, ctx, block_n, triton_ops.num_sms(q.device))
    rows = []
    for variant in [None] + DECODE_VARIANTS:
        if variant is None:
            label = f"default n{block_n}k{splits}"
            run = lambda: triton_ops.decode_attention(*dargs, **kw)  # noqa: E731
        else:
            bn, ns, w, st = variant
            label = f"n{bn}k{ns}w{w}s{st}"
            run = lambda bn=bn, ns=ns, w=w, st=st: launch_decode(  # noqa: E731
                *dargs, **kw, block_n=bn, num_splits=ns, num_warps=w, num_stages=st,
                upcast=interp,
            )  # fmt: skip
        row = {"op": "decode", "model": name, "batch": s, "context": ctx, "config": label}
        try:
            row["rel_err"] = _rel_err(run(), ref)
            ms = _bench(run, args.rep_ms, dev)
            gbs = kv_bytes / ms / 1e6
            row.update(ms=ms, gb_per_s=gbs, pct_of_copy=100 * gbs / bandwidth)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    return rows


def _store_rows(name: str, bandwidth: float, args: argparse.Namespace) -> list[dict]:
    from gemma_serve.kernels import triton_ops

    dev, (_, hkv, d) = args.device, SHAPES[name]
    t = args.prefill_len * args.prefill_seqs
    k = torch.randn(t, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k_cache = torch.full((2 * t, hkv, d), float("nan"), device=dev, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(2 * t, device=dev)[:t]
    triton_ops.store_kv(k, v, k_cache, v_cache, slots)
    exact = bool(torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v))
    ms = _bench(lambda: triton_ops.store_kv(k, v, k_cache, v_cache, slots), args.rep_ms, dev)
    gbs = 2 * 2 * k.numel() * k.element_size() / ms / 1e6  # k and v, read + written
    return [{"op": "store_kv", "model": name, "tokens": t, "config": "default", "ms": ms,
             "gb_per_s": gbs, "pct_of_copy": 100 * gbs / bandwidth, "exact": exact}]  # fmt: skip


def table(rows: list[dict]) -> str:
    """One line per timed config: op, model, window, config, ms, throughput, error."""
    lines = [f"{'op':9}{'model':12}{'window':>7}  {'config':22}{'ms':>9}  result"]
    for r in rows:
        win = str(r.get("window")) if r["op"] == "prefill" else "-"
        head = f"{r['op']:9}{r['model']:12}{win:>7}  {r['config']:22}"
        if "error" in r:
            lines.append(f"{head}{'-':>9}  {r['error'][:70]}")
            continue
        if r["op"] == "prefill":
            res = f"{r['tflops']:.1f} TFLOP/s"
        else:
            res = f"{r['gb_per_s']:.0f} GB/s ({r['pct_of_copy']:.0f}% of copy)"
        if "rel_err" in r:
            res += f"  err {r['rel_err']:.1e}"
        elif "exact" in r:
            res += "  exact" if r["exact"] else "  WRONG"
        lines.append(f"{head}{r['ms']:9.3f}  {res}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("kernel_bench.json"), help="JSON output")
    smoke = "cpu: a smoke run under TRITON_INTERPRET=1 (no real timings)"
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=smoke)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (for --device cpu)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--prefill-seqs", type=int, default=2)
    parser.add_argument("--prefill-len", type=int, default=8192)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--decode-ctx", type=int, default=4096)
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time")
    parser.add_argument("--no-flex", action="store_true", help="skip the flex_attention baseline")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prefill_seqs, args.prefill_len, args.decode_batch, args.decode_ctx = 2, 24, 3, 40
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU found (--device cpu for a smoke run)",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(args.rep_ms, args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    result: dict = {"device": device, "copy_gb_per_s": bandwidth, "rows": []}
    print(f"device: {device}, copy bandwidth {bandwidth:.0f} GB/s")
    print(table([]), flush=True)  # the header; rows follow as each group is measured
    window = WINDOW if not args.tiny else 16  # shorter than the sequences, so it matters
    # Decode first (quick, and the bandwidth target), then prefill (flex compiles take longest).
    groups = [partial(_decode_rows, name, bandwidth, args) for name in args.models]
    groups += [partial(_store_rows, name, bandwidth, args) for name in args.models]
    groups += [partial(_prefill_rows, n, w, args) for n in args.models for w in (window, None)]
    for group in groups:  # results are written as they come: a time limit keeps what ran
        new = group()
        print(table(new).split("\n", 1)[1], flush=True)
        result["rows"] += new
        args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
