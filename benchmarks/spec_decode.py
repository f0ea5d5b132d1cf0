"""N-gram speculative decoding against none, side by side, on the embedded default model.

Three workloads, each run on an engine without speculation and one with
--speculative-config ngram (the runs alternate, after a warm-up each):
- grounded, concurrency 1: a passage, then "repeat it word for word" (the answer copies
  the prompt: where prompt lookup pays);
- open, concurrency 1: open-ended writing with no passage to copy, sampled (temperature 1,
  top_p 0.95, a seed per request) so that the small model does not fall into loops;
- mixed, concurrency 32: both kinds together, where disable_by_batch_size turns speculation
  off (the batch is compute-bound).
Grounded and mixed are greedy; --max-tokens output tokens at most (EOS ends a request earlier).
Reported: output tokens/s of each and their ratio, the acceptance rate (accepted / draft
tokens), the mean tokens per decode step of a request (1 + accepted drafts: at concurrency 1,
output tokens / decode steps), and whether the outputs are identical. The int8 default model
has ~1e-3 logprob noise between batch shapes, so a greedy near-tie may break differently in a
verification chunk than in a decode; where int8 outputs differ, the concurrency-1 workloads are
also run on the exact fp32 path (--quantization none) for the identity check.

    .venv/bin/python -m benchmarks.spec_decode
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams
from gemma_serve.server.engine.spec_config import SpeculativeConfig

from benchmarks.cpu_info import cpu_summary

PASSAGES = [
    "The lighthouse stood at the edge of the northern cliffs for two hundred years. Every "
    "night its keeper climbed the spiral stairs, trimmed the wick, polished the great lens and "
    "watched the beam sweep across the dark water. Ships that passed in the storms of winter "
    "counted on that light to find the narrow channel between the rocks. When the keeper grew "
    "old, the town built an automatic lamp, but the fishermen still said that the light had "
    "never been as steady as when a person tended it by hand.",
    "To make bread, mix five hundred grams of flour with ten grams of salt and seven grams of "
    "dried yeast. Add three hundred and fifty millilitres of warm water and stir until a rough "
    "dough forms. Knead it on a floured table for ten minutes, until it is smooth and elastic. "
    "Leave it in a covered bowl for an hour, until it has doubled in size. Shape it into a "
    "loaf, let it rise for another thirty minutes, and bake it at two hundred and twenty "
    "degrees for thirty five minutes, until the crust is brown and the base sounds hollow.",
    "def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    while i < len(left) "
    "and j < len(right):\n        if left[i] <= right[j]:\n            result.append(left[i])\n"
    "            i += 1\n        else:\n            result.append(right[j])\n            j += 1"
    "\n    result.extend(left[i:])\n    result.extend(right[j:])\n    return result\n",
]
OPEN = [
    "Write a short story about a dragon who learns to cook.",
    "Explain why the sky is blue to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains, with a sentence on each.",
]


@dataclass
class Run:
    tokens: list[list[int]]
    seconds: float
    draft: int = 0
    accepted: int = 0
    decode_steps: int = 0  # steps after the first token of each request (concurrency 1)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def engine(spec: SpeculativeConfig | None, quant: str | None) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            max_num_seqs=64,
            max_model_len=2048,
            speculative_config=spec,
            quantization=quant,
            seed=0,
        )
    )


def prompts(eng: LLMEngine, kind: str) -> list[list[int]]:
    tok = eng.tokenizer
    if kind == "grounded":
        texts = [f"{p}\n\nRepeat the text above word for word." for p in PASSAGES]
    else:
        texts = OPEN
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def serve(
    eng: LLMEngine, batches: list[list[list[int]]], max_tokens: int, sampled: bool = False
) -> Run:
    """Each batch served to completion in turn (a batch: the requests in flight together).
    Greedy, or sampled (temperature 1, top_p 0.95) with a seed per request: a seeded request
    draws the same tokens with speculation as without, so identity is checked either way."""
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if sampled else 0.0,
        top_p=0.95 if sampled else 1.0,
        stop_token_ids=tuple(eng.tokenizer.stop_token_ids(chat=True)),
    )
    out, run = [], Run([], 0.0)
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        ids = [f"b{b}-{i}" for i in range(len(batch))]
        got: dict[str, list[int]] = {}
        for rid, p in zip(ids, batch, strict=True):
            seeded = replace(params, seed=len(out) + len(got)) if sampled else params
            eng.add_request(rid, p, seeded)
            got[rid] = []
        while eng.has_work:
            outputs = eng.step()
            stats = eng.stats()
            run.draft += stats.num_draft_tokens
            run.accepted += stats.num_accepted_tokens
            run.decode_steps += any(len(got[o.request_id]) for o in outputs)
            for o in outputs:
                got[o.request_id] += o.new_token_ids
        out += [got[rid] for rid in ids]
    run.tokens, run.seconds = out, time.perf_counter() - start
    return run


def workload(
    args: argparse.Namespace,
    kind: str,
    engines: dict[str, LLMEngine],
    exact: Callable[[], dict[str, LLMEngine]] | None = None,
) -> dict:
    """One workload on both engines; `exact` builds the fp32 pair for the identity rerun."""
    base, spec = engines["none"], engines["ngram"]
    if kind == "mixed":
        ps = prompts(base, "grounded") + prompts(base, "open")
        batches = [[ps[i % len(ps)] for i in range(args.concurrency)]]
    else:
        batches = [[p] for p in prompts(base, kind)]
    sampled = kind == "open"
    serve(base, batches[:1], 8), serve(spec, batches[:1], 8)  # warm-up
    runs: dict[str, list[Run]] = {"none": [], "ngram": []}
    for _ in range(args.repeats):
        for name in ("none", "ngram"):
            runs[name].append(serve(engines[name], batches, args.max_tokens, sampled))
    a, b = runs["none"][-1], runs["ngram"][-1]
    rate = {n: sum(r.num_tokens for r in rs) / sum(r.seconds for r in rs) for n, rs in runs.items()}
    row = {
        "workload": kind,
        "concurrency": len(batches[0]),
        "output_tokens": b.num_tokens,
        "none_tok_s": rate["none"],
        "ngram_tok_s": rate["ngram"],
        "ratio": rate["ngram"] / rate["none"],
        "acceptance": b.accepted / b.draft if b.draft else None,
        "tokens_per_step": b.num_tokens / b.decode_steps if len(batches[0]) == 1 else None,
        "identical": a.tokens == b.tokens,
    }
    if not row["identical"] and exact is not None:
        x, y = (serve(exact()[n], batches, args.max_tokens, sampled) for n in ("none", "ngram"))
        row["identical_fp32"] = x.tokens == y.tokens
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| workload | concurrency | output tokens | no spec tok/s | ngram tok/s | ratio | "
        "acceptance | tokens / step | identical |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        same = "yes" if r["identical"] else "no"
        if "identical_fp32" in r:
            same += f" (fp32: {'yes' if r['identical_fp32'] else 'no'})"
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        tps = f"{r['tokens_per_step']:.2f}" if r["tokens_per_step"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['output_tokens']} | "
            f"{r['none_tok_s']:.1f} | {r['ngram_tok_s']:.1f} | {r['ratio']:.2f}x | {acc} | "
            f"{tps} | {same} |"
        )
    k, lo, hi, d = args.k, args.lookup_min, args.lookup_max, args.disable_by_batch_size
    lines.append(
        f"\nngram: k={k}, prompt_lookup_min={lo}, prompt_lookup_max={hi}, "
        f"disable_by_batch_size={d}; quantization {args.quantization or 'default (int8)'}; "
        f"max_tokens {args.max_tokens}; greedy but open (seeded, temperature 1, top_p 0.95); "
        f"{args.repeats} run(s) each, alternating."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--disable-by-batch-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quantization", default=None, help="default: the model's (int8)")
    ap.add_argument("--no-fp32-check", action="store_true", help="skip the fp32 identity rerun")
    args = ap.parse_args()
    spec = SpeculativeConfig(
        "ngram",
        args.k,
        prompt_lookup_max=args.lookup_max,
        prompt_lookup_min=args.lookup_min,
        disable_by_batch_size=args.disable_by_batch_size,
    )
    engines = {"none": engine(None, args.quantization), "ngram": engine(spec, args.quantization)}
    fp32 = None
    if not args.no_fp32_check and args.quantization != "none":
        fp32 = cache(lambda: {"none": engine(None, "none"), "ngram": engine(spec, "none")})
    rows = [
        workload(args, "grounded", engines, fp32),
        workload(args, "open", engines, fp32),
        workload(args, "mixed", engines),
    ]
    print(json.dumps({"cpu": cpu_summary(), "rows": rows}, indent=1))
    print()
    print(table(rows, args))


if __name__ == "__main__":
    main()
