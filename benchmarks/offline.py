"""Offline throughput: gemma-serve's engine vs Hugging Face transformers generate, same run.

Workload: N requests with prompt lengths drawn uniformly (seeded) from [min_prompt, max_prompt]
and exactly `output` generated tokens each (greedy, EOS ignored). transformers runs padded
batches of --hf-batch requests (left padding); the engine gets all requests at once.

    .venv/bin/python -m benchmarks.offline                    # the embedded default model
    .venv/bin/python -m benchmarks.offline --model DIR --requests 64 --output 64

Prints one JSON line per system and the ratio; transformers is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.llm_engine import LLMEngine
from gemma_serve.server.engine.sampling_params import SamplingParams


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [[2] + torch.randint(10, vocab, (k - 1,), generator=g).tolist() for k in lengths]


def run_engine(model_dir: str | None, prompts: list[list[int]], output: int, args) -> dict:
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            device="cpu",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            pack_cpu_weights=not args.no_pack,
        )
    )
    params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "system": "gemma-serve engine",
        "seconds": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "outputs": [r.token_ids for r in results],
    }


def run_hf(model_dir: Path, prompts: list[list[int]], output: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    attn = "eager" if cfg.get("model_type") == "gemma2" else "sdpa"  # eager: soft-capping
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    ).eval()
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=output,
                min_new_tokens=output,
                do_sample=False,
                pad_token_id=0,
            )
        outputs += out[:, width:].tolist()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {
        "system": f"transformers generate (padded batches of {batch})",
        "seconds": elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--no-pack", action="store_true", help="torch's CPU GEMMs, not oneDNN's (before/after)"
    )
    ap.add_argument("--model", default=None, help="HF directory (default: the embedded model)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from gemma_serve.model.default_model import default_model_dir

        model_dir = default_model_dir()
    else:
        model_dir = Path(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = workload(
        args.requests, args.min_prompt, args.max_prompt, min(vocab, 32000), args.seed
    )
    ours = run_engine(str(model_dir), prompts, args.output, args)
    hf = run_hf(model_dir, prompts, args.output, args.hf_batch)
    same = sum(a == b for a, b in zip(ours["outputs"], hf["outputs"], strict=True))
    for r in (ours, hf):
        r.pop("outputs")
        print(json.dumps(r))
    print(
        json.dumps(
            {
                "model": str(model_dir),
                "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                "requests": args.requests,
                "prompt_range": [args.min_prompt, args.max_prompt],
                "output": args.output,
                "ratio": ours["output_tokens_per_s"] / hf["output_tokens_per_s"],
                "identical_greedy_outputs": f"{same}/{args.requests}",
            }
        )
    )


if __name__ == "__main__":
    main()
