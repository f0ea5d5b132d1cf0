"""The `gemma-serve` flags (DESIGN.md's, with vLLM's and uvicorn's names) and their parsing
into an argparse namespace; server/cli.py turns that into the engine config and serving options.
"""

from __future__ import annotations

import argparse
import os
import re

from gemma_serve.server.connections import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_READ_TIMEOUT_S,
)
from gemma_serve.server.engine.config import (
    DEVICES,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
)
from gemma_serve.server.engine.spec_config import SpeculativeConfig, parse_speculative_config
from gemma_serve.server.state import API_KEY_ENV

LOG_LEVELS = ("debug", "info", "warning", "error")
KEEP_ALIVE_S = 5.0  # uvicorn's default --timeout-keep-alive
MAX_HEADER_BYTES = 16 * 1024  # h11's (and uvicorn's) default incomplete-event size
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)


def byte_size(text: str) -> int:
    """'1073741824', '4GiB', '512M' -> bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a number of bytes such as 4GiB, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def speculative_config(text: str) -> SpeculativeConfig:
    """The --speculative-config JSON, checked (a bad one is a start-up error naming why)."""
    try:
        return parse_speculative_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma-serve", description="OpenAI-compatible inference server for Gemma 2 / 3."
    )
    add = p.add_argument
    add("--model", help="Hugging Face directory, .gguf file or preset (default: embedded model)")
    add("--served-model-name", help="model name in the API (default: derived from --model)")
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    add("--device", choices=DEVICES, help="where to run (default: auto)")
    add("--dtype", choices=DTYPES, help="weights and activations dtype (default: auto)")
    add("--max-model-len", type=int, help="context length (default: the model's)")
    add("--max-num-seqs", type=int, help="most requests in one batch")
    add("--max-num-batched-tokens", type=int, help="most tokens in one engine step")
    add(
        "--long-prefill-token-threshold",
        type=int,
        metavar="N",
        help="a prompt with more than N tokens left to prefill is long: while other requests "
        "wait it gets at most N tokens a step (default: max-num-batched-tokens / 2; 0: off)",
    )
    add(
        "--max-num-partial-prefills",
        type=int,
        metavar="N",
        help="most requests partially prefilled at once (default: 2)",
    )
    add(
        "--max-long-partial-prefills",
        type=int,
        metavar="N",
        help="most long prompts partially prefilled at once; shorter ones go first (default: 1)",
    )
    add("--block-size", type=int, help="tokens per KV-cache block")
    add("--kv-cache-memory", type=byte_size, metavar="BYTES", help="KV-cache budget on CPU")
    add(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        help="KV-cache dtype (default: auto: bfloat16 under --quantization int8, else the "
        "model's); bfloat16 halves a float32 model's cache",
    )
    add("--gpu-memory-utilization", type=float, metavar="F", help="GPU memory share (0, 1]")
    add("--max-queued-requests", type=int, help="waiting requests before answering 429")
    add("--api-key", default=os.environ.get(API_KEY_ENV), help=f"required key (or ${API_KEY_ENV})")
    add("--seed", type=int, help="engine seed for unseeded sampling")
    add("--load-format", choices=LOAD_FORMATS, help="dummy: random weights of a preset's shape")
    add(
        "--quantization",
        choices=QUANTIZATIONS,
        help="weights on CPU: none (exact fp32) or int8 (int8 weights x int8 activations); "
        "default: int8 for the embedded model and GGUF files on CPU, none otherwise",
    )
    add(
        "--speculative-config",
        type=speculative_config,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (optional "disable_by_batch_size": '
        "no speculation with more running requests than that)",
    )
    add("--force-reference-kernels", action="store_true", help="pure-torch kernels, no Triton")
    add(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs for decode steps; on CPUs, no compiled one-row decode layers "
        "(int8; compiled by inductor in the background after start-up)",
    )
    add(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        help="reuse the KV of prompt prefixes computed before (default: on)",
    )
    _add_parallel_flags(p)
    add("--allowed-origins", nargs="+", default=[], help="CORS origins (off when not given)")
    add(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info (tokenizer config and chat template, as vLLM)",
    )
    add("--log-level", choices=LOG_LEVELS, default="info", help="(default: %(default)s)")
    _add_connection_flags(p)
    return p


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """Tensor parallelism (vLLM's names; docs/MULTI_NODE.md). torchrun's environment, when
    present, gives the ranks instead."""
    add = p.add_argument
    add(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        metavar="N",
        help="split the model over N ranks (one GPU each; CPU ranks share the threads)",
    )
    add(
        "--distributed-init-method",
        metavar="tcp://HOST:PORT",
        help="where the ranks meet (node 0's address; default: a free local port)",
    )
    add("--nnodes", type=int, metavar="N", help="machines the ranks span (default: 1)")
    add("--node-rank", type=int, metavar="K", help="this machine's index (node 0 serves HTTP)")
    add(
        "--distributed-timeout",
        type=float,
        metavar="S",
        help="a collective waiting this long (a hung rank) stops the server (default: 60)",
    )


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    """uvicorn's names where uvicorn has the setting; --timeout-request-read is ours."""
    add = p.add_argument
    add(
        "--limit-concurrency",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="most open connections; idle ones are closed first to make room, and when all "
        "hold requests only /health and /metrics are answered (default: %(default)s)",
    )
    add(
        "--timeout-keep-alive",
        type=float,
        default=KEEP_ALIVE_S,
        metavar="S",
        help="close a kept-alive connection idle this long (default: %(default)s)",
    )
    add(
        "--timeout-request-read",
        type=float,
        default=DEFAULT_REQUEST_READ_TIMEOUT_S,
        metavar="S",
        help="seconds a client gets to send a request's headers and body, else 408 and close "
        "(default: %(default)s)",
    )
    add(
        "--h11-max-incomplete-event-size",
        type=byte_size,
        default=MAX_HEADER_BYTES,
        metavar="BYTES",
        help="largest request head (line + headers); larger ones get 431 (default: %(default)s)",
    )


ENGINE_FLAGS = (
    "model",
    "served_model_name",
    "device",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "long_prefill_token_threshold",
    "max_num_partial_prefills",
    "max_long_partial_prefills",
    "block_size",
    "kv_cache_memory",
    "kv_cache_dtype",
    "gpu_memory_utilization",
    "max_queued_requests",
    "seed",
    "load_format",
    "force_reference_kernels",
    "enforce_eager",
    "enable_prefix_caching",
    "quantization",
    "tensor_parallel_size",
    "distributed_init_method",
    "nnodes",
    "node_rank",
    "distributed_timeout",
    "speculative_config",
)
