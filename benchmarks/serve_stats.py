"""The serving benchmark's statistics: per-run summary, the printed tables, the sweep plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.serve_client import RequestResult

STATS = ("mean", "p50", "p90", "p99")
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E"))


def describe_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 (linear interpolation, as numpy) of seconds, in milliseconds;
    all None when there are no values."""
    if not values_s:
        return dict.fromkeys(STATS)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """Counts, throughputs and latency statistics of one run; failed requests count as errors
    and add no tokens or latencies."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown error" for r in results if not r.ok)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)

    def rate(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": dict(errors.most_common(5)),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(input_tokens + output_tokens),
        "ttft_ms": describe_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": describe_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": describe_ms([gap for r in ok for gap in r.itl_s]),
        "e2el_ms": describe_ms([r.latency_s for r in ok]),
    }


def format_grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns right-aligned (the first left-aligned) under a header and a rule."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(r) for r in rows)])


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_tables(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Two tables over (label, summary) rows: throughput (one row per run), then latencies
    (one row per run and metric, in ms)."""
    throughput = format_grid(
        [
            "load",
            "ok",
            "errors",
            "time s",
            "req/s",
            "out tok/s",
            "total tok/s",
            "in tok",
            "out tok",
        ],
        [
            [
                label,
                str(s["completed"]),
                str(s["errors"]),
                _num(s["duration_s"], 2),
                _num(s["request_throughput"], 2),
                _num(s["output_throughput"]),
                _num(s["total_token_throughput"]),
                str(s["input_tokens"]),
                str(s["output_tokens"]),
            ]
            for label, s in rows
        ],
    )
    latency = format_grid(
        ["load", "latency (ms)", *STATS],
        [
            [label if i == 0 else "", name, *(_num(s[key][stat], 2) for stat in STATS)]
            for label, s in rows
            for i, (key, name) in enumerate(LATENCIES)
        ],
    )
    return f"{throughput}\n\n{latency}"


def plot_sweep(
    loads: Sequence[float], summaries: Sequence[dict[str, Any]], x_label: str, path: str
) -> bool:
    """Latency percentiles against load, one panel per metric, saved to `path`; False (nothing
    written) when matplotlib is not installed (it is an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, name) in zip(axes.flat, LATENCIES, strict=True):
        for stat in ("p50", "p90", "p99"):
            ys = [np.nan if s[key][stat] is None else s[key][stat] for s in summaries]
            ax.plot(loads, ys, marker="o", label=stat)
        if all(x > 0 for x in loads):
            ax.set_xscale("log")
            ax.set_xticks(list(loads), labels=[f"{x:g}" for x in loads])
            ax.minorticks_off()
        ax.set(title=name, xlabel=x_label, ylabel="ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
