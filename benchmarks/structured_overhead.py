"""What structured outputs cost an engine step, and what compiling a grammar costs.

32 requests decode together on the embedded default model; in one run none is constrained, in
the other half are (a JSON schema that keeps them writing: an array of at least 60 strings).
Once every request is decoding, --steps engine steps are timed; the runs alternate
none / half / none / half. Then a few schemas are compiled cold and again (cached).

    .venv/bin/python -m benchmarks.structured_overhead
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.structured_spec import StructuredSpec

from benchmarks.cpu_info import cpu_summary

LONG = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 60}
SCHEMAS = {
    "long_array": LONG,
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
            },
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["id", "items", "status"],
    },
}


def spec(schema: dict) -> StructuredSpec:
    return StructuredSpec("json", json.dumps(schema, sort_keys=True), "response_format")


def step_ms(engine: LLMEngine, constrained: int, args: argparse.Namespace) -> float:
    """Mean ms per step of `args.requests` decoding requests, `constrained` of them JSON."""
    g = torch.Generator().manual_seed(0)
    grammar = engine.compile_structured(spec(LONG)).grammar
    for i in range(args.requests):
        prompt = [2] + torch.randint(10, 30000, (100,), generator=g).tolist()
        params = SamplingParams(
            max_tokens=args.steps + 40,
            temperature=0.0,
            ignore_eos=i >= constrained,
            structured=grammar if i < constrained else None,
        )
        engine.add_request(f"r{i}", prompt, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / args.steps * 1000
    assert len(engine.scheduler.running) == args.requests, "a request ended inside the timing"
    for r in list(engine.scheduler.running):
        engine.abort(r.request_id)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quantization", default=None)
    args = ap.parse_args()
    engine = LLMEngine(
        EngineConfig(device="cpu", max_num_seqs=args.requests, quantization=args.quantization)
    )
    runs = {"none": [], "half": []}
    for _ in range(2):
        runs["none"].append(step_ms(engine, 0, args))
        runs["half"].append(step_ms(engine, args.requests // 2, args))
    compile_ms = {}
    for name, schema in SCHEMAS.items():
        fresh = spec({**schema, "description": f"cold {time.time()}"})  # never cached before
        cold = engine.compile_structured(fresh)
        warm = engine.compile_structured(fresh)
        compile_ms[name] = {"cold": round(cold.seconds * 1000, 1), "cached": warm.cache_hit}
    none, half = min(runs["none"]), min(runs["half"])
    print(
        json.dumps(
            {
                "requests": args.requests,
                "linear": engine.loaded.deployment.linear,
                "step_ms": {k: [round(v, 2) for v in vs] for k, vs in runs.items()},
                "overhead": round(half / none - 1.0, 4),
                "compile_ms": compile_ms,
                "cpu": cpu_summary(),
            }
        )
    )


if __name__ == "__main__":
    main()
