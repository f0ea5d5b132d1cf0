"""Where an engine step's time goes: scheduling + batch building, forward, sampling, output.

Runs N requests (prompts of random ids, lengths uniform in [--min-prompt, --max-prompt]) on the
embedded default model (or --model DIR) until all are decoding, then times --steps decode steps
phase by phase, and reports the share of a step spent outside the model forward.

    .venv/bin/python -m benchmarks.step_profile --requests 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.spec_verify import sample_and_verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--no-pack", action="store_true", help="torch's CPU GEMMs, not oneDNN's (before/after)"
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default=None, help="none or int8 (default: the engine's)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=20)
    ap.add_argument("--max-prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            device="cpu",
            max_num_seqs=args.requests,
            max_num_batched_tokens=2048,
            pack_cpu_weights=not args.no_pack,
            quantization=args.quantization,
        )
    )
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=g)
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(lengths.tolist()):
        engine.add_request(
            f"r{i}", [2] + torch.randint(10, 30000, (n,), generator=g).tolist(), params
        )
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    phases = {"schedule+build": 0.0, "forward": 0.0, "sample": 0.0, "update+detokenize": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sched = engine.scheduler.schedule()
        batch = engine.runner.build(sched)
        t1 = time.perf_counter()
        logits = engine.runner.forward(batch).logits
        t2 = time.perf_counter()
        verified = sample_and_verify(engine.sampler, logits, sched.chunks)
        t3 = time.perf_counter()
        engine.scheduler.update(
            sched,
            {r.request_id: t for r, t in zip(verified.requests, verified.tokens, strict=True)},
        )
        for r, t, lp in zip(verified.requests, verified.tokens, verified.logprobs, strict=True):
            engine._postprocess(r, t, lp)
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k] += dt
    total = sum(phases.values())
    report = {
        "requests": args.requests,
        "batch": len(batch.sampling_requests),
        "ms_per_step": {k: round(v / args.steps * 1000, 2) for k, v in phases.items()},
        "outside_forward_fraction": round(1 - phases["forward"] / total, 4),
        "decode_tokens_per_s": round(len(batch.sampling_requests) * args.steps / total, 1),
        "threads": torch.get_num_threads(),
        "linear": engine.loaded.deployment.linear,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
