"""Serving benchmark: load an OpenAI-compatible server with streamed requests and measure TTFT,
inter-token latency, TPOT, end-to-end latency and throughput (like vLLM's benchmark_serving).

    python benchmarks/serve.py --input-len 512 --output-len 128 --num-prompts 200 \\
        --request-rate 4                               # Poisson arrivals, 4 req/s
    python benchmarks/serve.py --concurrency 8         # 8 clients, back to back
    python benchmarks/serve.py --sweep-concurrency 1,16,64 --num-prompts 8,64,256 \\
        --out results.json --plot latency.png          # one run (table row) per concurrency

Requests stream (`stream_options.include_usage`) with `ignore_eos`, so each generates exactly
its max_tokens; prompt token counts are exact when the server has /tokenize. The core lives in
serve_runner.py (`run_benchmark(BenchConfig) -> BenchResult`, re-exported here); this file is
the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (python benchmarks/serve.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import TypeVar  # noqa: E402

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.serve_client import (  # noqa: E402
    ENDPOINTS,
    RequestResult,
    normalize_base_url,
    wait_ready,
)
from benchmarks.serve_runner import (  # noqa: E402
    BenchConfig,
    BenchResult,
    run_benchmark,
    sweep_configs,
)
from benchmarks.serve_stats import format_tables, plot_sweep, summarize  # noqa: E402

__all__ = ["BenchConfig", "BenchResult", "RequestResult", "main", "run_benchmark", "summarize"]
API_KEY_ENV = "GEMMA_SERVE_API_KEY"
# What stops a run before it starts: no server, no model listed, a bad prompts file.
SETUP_ERRORS = (httpx.HTTPError, OSError, RuntimeError, ValueError, TimeoutError)
T = TypeVar("T")


def _listof(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse type for comma-separated values: '1,8,32' -> [1, 8, 32]."""

    def parse(text: str) -> list[T]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers: {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/serve.py", description="Serving benchmark for OpenAI-compatible servers."
    )
    add = p.add_argument
    add("--base-url", default="http://127.0.0.1:8000", help="server (default: %(default)s)")
    add("--model", help="model name (default: the first id of GET /v1/models)")
    add("--api-key", default=os.environ.get(API_KEY_ENV), help=f"bearer key (or ${API_KEY_ENV})")
    add("--endpoint", choices=list(ENDPOINTS), default="completions", help="(default: completions)")
    add("--ready-timeout", type=float, default=0.0, metavar="S", help="first wait for /health")
    w = p.add_argument_group("workload")
    w.add_argument(
        "--num-prompts",
        type=_listof(int),
        default=[],
        metavar="N[,N...]",
        help="requests per run (one per sweep point, or one for all; default: "
        "200, or every line of --prompts-file)",
    )
    w.add_argument("--input-len", type=int, default=512, help="mean prompt tokens (synthetic)")
    w.add_argument("--output-len", type=int, default=128, help="mean generated tokens")
    w.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len*(1-r), len*(1+r)] (default: 0)",
    )
    w.add_argument("--prompts-file", help='JSONL of {"prompt": str, "max_tokens": int}')
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument(
        "--extra-body",
        default="{}",
        help='JSON object merged into every request, e.g. \'{"logit_bias": {"1": -100}}\'',
    )
    w.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at EOS (output lengths then vary)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals in req/s (default: inf, all at once)",
    )
    load.add_argument("--concurrency", type=int, help="most requests in flight (default: no cap)")
    load.add_argument("--sweep-concurrency", type=_listof(int), default=[], metavar="C,C,...")
    load.add_argument("--sweep-rate", type=_listof(float), default=[], metavar="R,R,...")
    load.add_argument("--warmup-requests", type=int, default=1, help="short, unmeasured")
    load.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may wait for bytes"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", help="write every run's summary and requests to this JSON file")
    out.add_argument("--detailed", action="store_true", help="keep each request's ITLs in --out")
    out.add_argument("--plot", help="latency percentiles vs load as an image (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """The runs the command line asks for (ValueError for inconsistent flags)."""
    base = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key or None,
        endpoint=args.endpoint,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prompts_file=args.prompts_file,
        seed=args.seed,
        request_rate=args.request_rate,
        concurrency=args.concurrency,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        extra_body=tuple(json.loads(args.extra_body).items()),
        warmup_requests=args.warmup_requests,
        timeout_s=args.timeout,
    )
    return sweep_configs(
        base,
        concurrencies=args.sweep_concurrency,
        rates=args.sweep_rate,
        num_prompts=args.num_prompts,
    )


def write_json(path: str, results: Sequence[BenchResult], detailed: bool) -> None:
    """All runs so far, written whole each time (a run cut short still leaves the earlier)."""
    doc = {
        "tool": "benchmarks/serve.py",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": [r.to_dict(detailed) for r in results],
    }
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(target)


async def run_cli(args: argparse.Namespace, configs: Sequence[BenchConfig]) -> int:
    """Runs the configurations one after another; prints the tables, writes --out and --plot.
    Exit status 1 when a run could not start (the runs before it are still reported) or
    completed no request."""
    failed: str | None = None
    results: list[BenchResult] = []
    try:
        if args.ready_timeout > 0:
            async with httpx.AsyncClient(timeout=10) as client:
                await wait_ready(client, normalize_base_url(args.base_url), args.ready_timeout)
        for config in configs:
            results.append(await _run_one(config, args.no_progress))
            if args.out:
                write_json(args.out, results, args.detailed)
    except SETUP_ERRORS as exc:
        failed = f"error: {type(exc).__name__}: {exc}"
    if results:
        print(f"model: {results[0].model}  endpoint: {configs[0].endpoint}")
        print(format_tables([(r.config.label, r.summary) for r in results]))
    for r in results:
        for message, count in r.summary["error_messages"].items():
            print(f"{r.config.label}: {count} x {message}", file=sys.stderr)
    if failed:
        print(failed, file=sys.stderr)
    if args.plot and results:
        _plot(args, results)
    return 0 if results and not failed and all(r.summary["completed"] for r in results) else 1


async def _run_one(config: BenchConfig, quiet: bool) -> BenchResult:
    """One run under a tqdm progress bar (on stderr)."""
    with tqdm(desc=config.label, unit="req", disable=quiet, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return await run_benchmark(config, progress)


def _plot(args: argparse.Namespace, results: Sequence[BenchResult]) -> None:
    by_rate = bool(args.sweep_rate)
    points = [
        (r.config.request_rate if by_rate else float(r.config.concurrency or 0), r.summary)
        for r in results
    ]
    points = [(x, s) for x, s in points if math.isfinite(x)]
    label = "request rate (req/s)" if by_rate else "concurrency"
    if len(points) < 2:
        print("--plot: needs a sweep of at least two finite loads; skipped", file=sys.stderr)
    elif not plot_sweep([x for x, _ in points], [s for _, s in points], label, args.plot):
        print(
            "--plot: matplotlib is not installed (pip install matplotlib); skipped", file=sys.stderr
        )
    else:
        print(f"plot: {args.plot}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python benchmarks/serve.py ...` or `python -m benchmarks.serve ...`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return asyncio.run(run_cli(args, configs))


if __name__ == "__main__":
    sys.exit(main())
