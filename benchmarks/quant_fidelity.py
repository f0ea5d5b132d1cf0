"""Fidelity of --quantization: perplexity over a fixed English text, and greedy agreement.

The text is Python's own documentation topics (`pydoc_data.topics`, sorted by topic name),
cut into windows of --window tokens, each scored after a BOS with echo-style prompt logprobs
through the engine. Perplexity = exp(-mean log p) over every scored token. Greedy agreement:
--prompts prompts (64-token slices of the same text) continued for --output tokens; the share
of continuations identical to the `none` ones, and the mean length of the common prefix.

    .venv/bin/python -m benchmarks.quant_fidelity                       # none vs int8, 20k tokens
    .venv/bin/python -m benchmarks.quant_fidelity --tokens 2000 --modes none int8
    .venv/bin/python -m benchmarks.quant_fidelity --modes none int8 int8/bfloat16  # KV dtype

Prints one JSON line per mode, then the comparison (recorded in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence

from gemma_serve.model.tokenizer import Tokenizer
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

from benchmarks.cpu_info import cpu_summary


def reference_tokens(tokenizer: Tokenizer, n: int) -> list[int]:
    """The first n tokens (no BOS) of the documentation topics, in sorted topic order."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer.encode(topics[name], add_bos=False)
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the topics hold only {len(ids)} tokens, fewer than {n}")


def prompt_logprobs(engine: LLMEngine, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p(token | everything before it) for every prompt token after the first."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    ids = [f"score-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, params)
    got: dict[str, list[float]] = {}
    while engine.has_work:
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got[out.request_id] = [lp.logprob for lp in out.prompt_logprobs[1:]]
    return [got[rid] for rid in ids]


def perplexity(engine: LLMEngine, tokens: list[int], window: int, bos: int) -> float:
    windows = [[bos] + tokens[i : i + window] for i in range(0, len(tokens), window)]
    scores = [lp for w in prompt_logprobs(engine, windows) for lp in w]
    assert len(scores) == len(tokens)
    return math.exp(-sum(scores) / len(scores))


def greedy(engine: LLMEngine, tokens: list[int], prompts: int, output: int, bos: int):
    step = len(tokens) // prompts
    starts = [i * step for i in range(prompts)]
    batch = [[bos] + tokens[s : s + 64] for s in starts]
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in engine.generate(batch, params)]


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """mode: a --quantization, optionally /KV_CACHE_DTYPE (int8/bfloat16)."""
    quantization, _, kv_dtype = mode.partition("/")
    start = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            device="cpu",
            quantization=quantization,
            kv_cache_dtype=kv_dtype or "auto",
            max_model_len=args.window + 1 + args.output + 64,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
    )
    load_s = time.perf_counter() - start
    tok = engine.tokenizer
    tokens = reference_tokens(tok, args.tokens)
    start = time.perf_counter()
    ppl = perplexity(engine, tokens, args.window, tok.bos_id)
    score_s = time.perf_counter() - start
    continuations = greedy(engine, tokens, args.prompts, args.output, tok.bos_id)
    return {
        "mode": mode,
        "linear": engine.loaded.deployment.linear,
        "scored_tokens": len(tokens),
        "perplexity": ppl,
        "load_s": round(load_s, 2),
        "score_s": round(score_s, 2),
        "continuations": continuations,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of identical continuations, mean common-prefix length)."""
    same, prefix = 0, 0
    for x, y in zip(a, b, strict=True):
        same += x == y
        prefix += next(
            (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y))
        )
    return same / len(a), prefix / len(a)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--modes", nargs="+", default=["none", "int8"])
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    args = p.parse_args(argv)
    results = [run_mode(m, args) for m in args.modes]
    base = results[0]
    for r in results:
        same, prefix = agreement(base["continuations"], r["continuations"])
        row = {k: v for k, v in r.items() if k != "continuations"}
        row.update(
            ppl_vs_first=r["perplexity"] / base["perplexity"] - 1.0,
            identical_continuations=same,
            mean_common_prefix=prefix,
        )
        print(json.dumps(row), flush=True)
    print(json.dumps({"cpu": cpu_summary()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
