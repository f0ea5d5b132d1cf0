"""Prefix caching: the same chat workload with the cache on and off, in one run.

Workload: a system prompt of about --system tokens shared by --requests conversations, each
with its own question of a few tokens, --output generated tokens (greedy, EOS ignored). Two
schedules, each timed with caching off and on (fresh engines over one loaded model):
- one after another (a chat app's turns): the time to first token of each request;
- all at once: the whole batch's wall time.
Also checks that the outputs with caching on equal those with it off.

    .venv/bin/python -m benchmarks.prefix_cache               # the embedded default model
    .venv/bin/python -m benchmarks.prefix_cache --model DIR --system 2000 --requests 16

Prints one JSON line per measurement and the on/off ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace

import torch
from gemma_serve.server.engine import model_source
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams

QUESTIONS = ["Why?", "How so?", "Who said that?", "When?", "Where is it?", "What next?"]


def conversations(engine: LLMEngine, system_tokens: int, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    sentence = "The quick brown fox jumps over the lazy dog while the band plays on. "
    system = sentence * max(1, system_tokens // len(tok.encode(sentence, add_bos=False)))
    return [
        tok.apply_chat_template(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"},
            ]
        )
        for i in range(n)
    ]


def first_token_seconds(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> float:
    """Time from adding the request to its first token; the request then runs to the end."""
    rid = f"b{time.perf_counter_ns()}"
    start = time.perf_counter()
    engine.add_request(rid, prompt, params)
    ttft = None
    while engine.has_work:
        for out in engine.step():
            if ttft is None and out.new_token_ids:
                ttft = time.perf_counter() - start
    return ttft or 0.0


def run(config: EngineConfig, loaded, prompts, params, caching: bool) -> dict:
    engine = LLMEngine(replace(config, enable_prefix_caching=caching), loaded)
    engine.generate([prompts[0][:8]], replace(params, max_tokens=2))  # warm-up
    ttfts = [first_token_seconds(engine, p, params) for p in prompts]
    batch = LLMEngine(replace(config, enable_prefix_caching=caching), loaded)
    start = time.perf_counter()
    results = batch.generate(prompts, params)
    wall = time.perf_counter() - start
    return {
        "prefix_caching": caching,
        "sequential_ttft_ms_median": round(statistics.median(ttfts) * 1000, 1),
        "sequential_ttft_ms_first": round(ttfts[0] * 1000, 1),
        "batch_seconds": round(wall, 2),
        "cached_tokens_sequential": engine.kv.num_cached_tokens,
        "cached_tokens_batch": batch.kv.num_cached_tokens,
        "outputs": [r.token_ids for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF dir or GGUF (default: embedded model)")
    ap.add_argument("--system", type=int, default=1000, help="system prompt tokens (about)")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(model=args.model, device="cpu", max_num_batched_tokens=1024)
    loaded = model_source.load(config)
    probe = LLMEngine(config, loaded)
    prompts = conversations(probe, args.system, args.requests)
    del probe
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    off = run(config, loaded, prompts, params, caching=False)
    on = run(config, loaded, prompts, params, caching=True)
    same = off.pop("outputs") == on.pop("outputs")
    meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads}
    meta |= {"prompt_tokens": [len(p) for p in prompts][:3], "requests": len(prompts)}
    print(json.dumps(meta))
    print(json.dumps(off))
    print(json.dumps(on))
    ratios = {
        "sequential_ttft_median_off_over_on": round(
            off["sequential_ttft_ms_median"] / on["sequential_ttft_ms_median"], 2
        ),
        "batch_off_over_on": round(off["batch_seconds"] / on["batch_seconds"], 2),
        "outputs_identical": same,
    }
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
