"""Step time of tensor parallelism on CPU: TP=2 (one thread per rank) against TP=1 (two
threads, and one for reference), so that the per-step communication cost is known.

On the embedded default model (or --model DIR), --quantization none (int8 does not shard):
- prefill: one request of --prefill tokens, one step;
- decode: B requests (prompts of 64 tokens) all decoding, --steps steps timed, median;
- at TP=2, on rank 0: the time in the step's broadcast to rank 1 (encode + Gloo) and in the
  model's collectives (all-reduces and the LM head's gather; this includes waiting for the
  other rank), per step;
- the step message's transport: Gloo broadcast (what the engine uses) against a
  multiprocessing pipe (a local queue), one way, for a decode step's message (32 requests).
Prints a markdown table ready for benchmarks/RESULTS.md.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.tp_step
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from gemma_serve.model.parallel import TensorGroup
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

PROMPT = 64


@dataclass
class Timer:
    """Seconds spent in wrapped calls since the last reset."""

    total: float = 0.0
    calls: int = 0
    samples: list[float] = field(default_factory=list)

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        return timed

    def cut(self) -> None:
        self.samples.append(self.total)
        self.total, self.calls = 0.0, 0


def build(args: argparse.Namespace, tp: int, threads: int) -> LLMEngine:
    torch.set_num_threads(threads * tp)  # launch gives each rank its share
    config = EngineConfig(
        model=args.model,
        device="cpu",
        quantization="none",
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=max(args.prefill, PROMPT * max(args.batches)),
        kv_cache_memory=1 << 30,
        enable_prefix_caching=False,
        tensor_parallel_size=tp,
    )
    return LLMEngine(config)


def timed_steps(engine: LLMEngine, timers: list[Timer], n: int) -> list[float]:
    out = []
    for _ in range(n):
        for t in timers:
            t.total = 0.0
        t0 = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t0)
        for t in timers:
            t.cut()
    return out


def measure(engine: LLMEngine, args: argparse.Namespace, timers: list[Timer]) -> dict[str, list]:
    """name -> [median step ms, median ms in each timer]."""
    g = torch.Generator().manual_seed(0)
    rows: dict[str, list] = {}
    ids = lambda n: [2] + torch.randint(10, 30000, (n - 1,), generator=g).tolist()  # noqa: E731
    samples = []
    for t in timers:
        t.samples.clear()
    for i in range(4):  # one step each: the whole prompt in one chunk; the first warms up
        engine.add_request(f"p{i}", ids(args.prefill), SamplingParams(max_tokens=1))
        samples += timed_steps(engine, timers, 1)
        while engine.has_work:
            engine.step()
    samples = samples[1:]
    for t in timers:
        del t.samples[0]
    rows[f"prefill {args.prefill}"] = _row(samples, timers)
    for b in args.batches:
        params = SamplingParams(max_tokens=args.steps + 4, temperature=0.0, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"d{b}-{i}", ids(PROMPT), params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
            engine.step()
        engine.step()
        for t in timers:
            t.samples.clear()
        rows[f"decode x{b}"] = _row(timed_steps(engine, timers, args.steps), timers)
        while engine.has_work:
            engine.step()
    return rows


def _row(samples: list[float], timers: list[Timer]) -> list:
    return [1e3 * statistics.median(samples)] + [
        1e3 * statistics.median(t.samples) if t.samples else None for t in timers
    ]


def tp_run(args: argparse.Namespace) -> dict[str, list]:
    """TP=2 with rank 0's broadcast and collectives timed."""
    send, coll = Timer(), Timer()
    TensorGroup.all_reduce = coll.wrap(TensorGroup.all_reduce)  # type: ignore[method-assign]
    TensorGroup.all_gather_last = coll.wrap(TensorGroup.all_gather_last)  # type: ignore
    engine = build(args, 2, 1)
    try:
        control = engine.loaded.workers.groups.control  # type: ignore[union-attr]
        control.send = send.wrap(control.send)  # type: ignore[method-assign]
        return measure(engine, args, [send, coll])
    finally:
        engine.close()


def _pipe_peer(conn, n: int) -> None:
    for _ in range(n):
        conn.send_bytes(b"k" if conn.recv_bytes() else b"")


def _gloo_peer(port: int, n: int) -> None:
    from gemma_serve.server.engine.tp_group import DistributedInit, connect

    init = DistributedInit(f"tcp://127.0.0.1:{port}", 2, 1, 1, 2)
    groups = connect(init, torch.device("cpu"), 60)
    for _ in range(n):
        groups.control.recv()
        _ack(groups, 1)


def _ack(groups, rank: int) -> None:
    """A one-byte answer from `rank` (so the sender can time a round trip)."""
    t = torch.zeros(1, dtype=torch.uint8)
    groups.control.pg.broadcast(t, 1).wait()


def transport(message: bytes, n: int = 300) -> dict[str, float]:
    """Round trip / 2 of the message (ack of one byte), microseconds: Gloo vs a pipe."""
    import socket

    from gemma_serve.server.engine.tp_group import DistributedInit, connect

    ctx = mp.get_context("spawn")
    out = {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = ctx.Process(target=_gloo_peer, args=(port, n))
    peer.start()
    groups = connect(
        DistributedInit(f"tcp://127.0.0.1:{port}", 2, 0, 0, 2), torch.device("cpu"), 60
    )
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        groups.control.send(message)
        _ack(groups, 1)
        times.append(time.perf_counter() - t0)
    peer.join()
    out["gloo broadcast"] = 1e6 * statistics.median(times) / 2
    a, b = ctx.Pipe()
    peer = ctx.Process(target=_pipe_peer, args=(b, n))
    peer.start()
    data_times = []
    for _ in range(n):
        t0 = time.perf_counter()
        a.send_bytes(message)
        a.recv_bytes()
        data_times.append(time.perf_counter() - t0)
    peer.join()
    out["multiprocessing pipe"] = 1e6 * statistics.median(data_times) / 2
    return out


def decode_message(batch: int) -> bytes:
    """A decode step's message for `batch` requests of ~100 tokens (block size 16)."""
    from gemma_serve.server.engine.attention_batch import AttentionBatch, PoolBatch
    from gemma_serve.server.engine.block_table import PoolKind
    from gemma_serve.server.engine.runner import ModelBatch
    from gemma_serve.server.engine.tp_wire import step_message

    ids = torch.arange(batch)
    i32 = ids.to(torch.int32)
    tables = torch.zeros(batch, 7, dtype=torch.int32)
    pools = {
        PoolKind.GLOBAL: PoolBatch(ids, tables, 0, 16),
        PoolKind.LOCAL: PoolBatch(ids, tables, 33, 16),
    }
    empty = torch.zeros(0, dtype=torch.int32)
    attention = AttentionBatch(batch, i32, torch.zeros(1, dtype=torch.int32), empty, pools)
    return step_message(ModelBatch(ids, ids, attention, ids, ()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the embedded model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    one2 = measure(build(args, 1, 2), args, [])
    one1 = measure(build(args, 1, 1), args, [])
    two = tp_run(args)
    wire = transport(decode_message(32))
    print(
        f"\n`OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.tp_step` ({datetime.date.today()};"
        f" {torch.__version__}; --quantization none; medians, ms per step)\n"
    )
    print("| step | TP=1, 2 threads | TP=1, 1 thread | TP=2, 1 thread/rank | TP=2 / TP=1 (2 thr) "
          "| rank 0: broadcast | rank 0: collectives |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (t2, *_) in one2.items():
        tp, send, coll = two[name]
        print(
            f"| {name} | {t2:.1f} | {one1[name][0]:.1f} | {tp:.1f} | {tp / t2:.2f}x "
            f"| {send:.2f} | {coll:.1f} |"
        )
    print(
        "\nStep message of 32 decodes, one way (round trip / 2): "
        + ", ".join(f"{k} {v:.0f} us" for k, v in wire.items())
    )


if __name__ == "__main__":
    main()
