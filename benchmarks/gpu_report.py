"""Helpers of benchmarks/gpu.sh: device copy bandwidth, the decode roofline, the final tables.

    python benchmarks/gpu_report.py bandwidth --out DIR/bandwidth.json   # needs CUDA
    python benchmarks/gpu_report.py summary DIR                          # no GPU needed

The roofline of single-stream decode: every step reads all weights once, so it cannot beat
bandwidth / weight bytes tokens per second. Bandwidth is measured as a large device-to-device
copy, counting bytes read plus bytes written.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: make the repository root (model/, benchmarks/) importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.serve_stats import format_grid  # noqa: E402

PRESETS = ("gemma-2-2b", "gemma-2-9b")
SWEEP = (1, 16, 64, 256)
BF16_BYTES = 2
COPY_BYTES = 2 << 30  # 2 GiB: far beyond any cache


def preset_params(name: str) -> int:
    """Parameters of a Gemma 2 preset (tied embedding counted once), from model/config.py."""
    from gemma_serve.model.config import preset

    c = preset(name)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (2 * q + 2 * kv)  # q, k, v, o projections
    mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
    norms = 4 * c.hidden_size  # Gemma 2's four RMSNorms per layer
    layer = attention + mlp + norms
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size


def copy_bandwidth(repeats: int = 20) -> dict[str, Any]:
    """Device-to-device copy bandwidth (read + write bytes per second) on the current GPU."""
    import torch

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    return {
        "device": torch.cuda.get_device_name(),
        "copy_bytes": COPY_BYTES,
        "seconds_per_copy": seconds,
        "bandwidth_bytes_per_s": 2 * COPY_BYTES / seconds,
    }


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_row(name: str, run_dir: Path, bandwidth: float | None) -> dict[str, Any]:
    """One model's headline numbers from its decode.json and sweep.json (None where missing)."""
    # A tensor-parallel run's folder is <preset>_tp<N> (gpu.sh).
    row: dict[str, Any] = {"model": name, "params": preset_params(name.partition("_tp")[0])}
    row["weight_bytes"] = row["params"] * BF16_BYTES
    row["roofline_tok_s"] = bandwidth / row["weight_bytes"] if bandwidth else None
    decode = _load(run_dir / name / "decode.json")
    tpot = decode["runs"][0]["summary"]["tpot_ms"]["mean"] if decode and decode["runs"] else None
    row["decode_tpot_ms"] = tpot
    row["decode_tok_s"] = 1000 / tpot if tpot else None
    if row["decode_tok_s"] and row["roofline_tok_s"]:
        row["roofline_fraction"] = row["decode_tok_s"] / row["roofline_tok_s"]
    else:
        row["roofline_fraction"] = None
    sweep = _load(run_dir / name / "sweep.json")
    runs = {r["config"]["concurrency"]: r["summary"] for r in (sweep or {}).get("runs", [])}
    row["sweep"] = {
        c: {
            "output_tok_s": s["output_throughput"],
            "total_tok_s": s["total_token_throughput"],
            "ttft_p50_ms": s["ttft_ms"]["p50"],
            "tpot_p50_ms": s["tpot_ms"]["p50"],
            "errors": s["errors"],
        }
        for c, s in runs.items()
    }
    return row


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary(run_dir: Path) -> dict[str, Any]:
    """Collects everything gpu.sh wrote under run_dir into summary.json; returns the tables."""
    bw = _load(run_dir / "bandwidth.json")
    bandwidth = bw["bandwidth_bytes_per_s"] if bw else None
    tp_runs = sorted(p.name for p in run_dir.glob("*_tp*") if p.is_dir())
    rows = [model_row(name, run_dir, bandwidth) for name in [*PRESETS, *tp_runs]]
    phases = [line.split("\t") for line in _read_lines(run_dir / "phases.tsv")[1:]]
    doc = {"bandwidth": bw, "models": rows, "phases": phases}
    (run_dir / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def format_summary(doc: dict[str, Any]) -> str:
    """Decode vs roofline per model, throughput per model and concurrency, and the phases."""
    bw = doc["bandwidth"]
    gbs = bw and bw["bandwidth_bytes_per_s"] / 1e9
    decode = format_grid(
        ["model", "params", "weights GB", "decode tok/s", "TPOT ms", "roofline tok/s", "% roof"],
        [
            [
                r["model"],
                f"{r['params'] / 1e9:.2f}B",
                f"{r['weight_bytes'] / 1e9:.1f}",
                _fmt(r["decode_tok_s"]),
                _fmt(r["decode_tpot_ms"], ".2f"),
                _fmt(r["roofline_tok_s"]),
                _fmt(r["roofline_fraction"] and 100 * r["roofline_fraction"]),
            ]
            for r in doc["models"]
        ],
    )
    throughput = format_grid(
        [
            "model",
            "concurrency",
            "out tok/s",
            "total tok/s",
            "TTFT p50 ms",
            "TPOT p50 ms",
            "errors",
        ],
        [
            [r["model"], str(c)]
            + [_fmt(s.get(k), ".1f") for k in ("output_tok_s", "total_tok_s")]
            + [_fmt(s.get(k), ".2f") for k in ("ttft_p50_ms", "tpot_p50_ms")]
            + [str(s.get("errors", "-"))]
            for r in doc["models"]
            for c in SWEEP
            for s in [r["sweep"].get(c, {})]
        ],
    )
    phases = format_grid(
        ["phase", "status", "seconds"], [p + [""] * (3 - len(p)) for p in doc["phases"]]
    )
    header = "copy bandwidth: not measured"
    if bw:
        header = f"copy bandwidth: {gbs:.0f} GB/s (read + write) on {bw['device']}"
    return "\n\n".join([header, decode, throughput, phases])


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bw = sub.add_parser("bandwidth", help="measure device copy bandwidth (CUDA)")
    bw.add_argument("--out", required=True)
    sm = sub.add_parser("summary", help="final table and summary.json of a gpu.sh run")
    sm.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "bandwidth":
        result = copy_bandwidth()
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
    else:
        print(format_summary(summary(Path(args.dir))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
