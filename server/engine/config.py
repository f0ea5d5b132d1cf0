"""Engine configuration: what the CLI flags set (names follow vLLM's)."""

from __future__ import annotations

from dataclasses import dataclass

from gemma_serve.model.config import QUANTIZATIONS
from gemma_serve.server.engine.prefill_policy import PrefillLimits
from gemma_serve.server.engine.spec_config import NGRAM, SpeculativeConfig

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
KV_CACHE_DTYPES = DTYPES  # auto: bfloat16 under int8 weights, else the model's dtype
DEFAULT_LONG_PREFILL_SHARE = 2  # default long-prefill threshold: max_num_batched_tokens / this


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine. model None serves the embedded default model."""

    model: str | None = None
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: a default share of memory
    kv_cache_dtype: str = "auto"  # the KV cache's dtype; auto: see kv_cache.kv_cache_dtype
    gpu_memory_utilization: float = 0.9
    max_queued_requests: int = 1024
    seed: int = 0
    load_format: str = "auto"
    force_reference_kernels: bool = False
    pack_cpu_weights: bool = True  # fp32 on CPU: oneDNN GEMMs on packed weights (cpu_gemm.py)
    # No CUDA graphs for decode steps (cuda_graphs.py); on CPUs, no compiled decode layers
    # (LLMEngine.compile_layers).
    enforce_eager: bool = False
    enable_prefix_caching: bool = True  # share cached prompt-prefix blocks (kv_manager.py)
    # None: int8 for the embedded model and GGUF checkpoints on CPU, else "none" (deploy.py)
    quantization: str | None = None
    # Fair prefill (prefill_policy.py). None: half of max_num_batched_tokens; 0: off.
    long_prefill_token_threshold: int | None = None
    max_num_partial_prefills: int = 2
    max_long_partial_prefills: int = 1
    # Tensor parallelism (tp_workers.py): ranks, and where they meet (multi-node).
    tensor_parallel_size: int = 1
    distributed_init_method: str | None = None  # tcp://HOST:PORT; None: a local port
    nnodes: int = 1
    node_rank: int = 0
    distributed_timeout: float = 60.0  # a collective waiting longer fails the engine
    # --speculative-config (spec_config.py); None: no speculative decoding
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        checks = [
            ("device", self.device in DEVICES, f"must be one of {DEVICES}"),
            ("dtype", self.dtype in DTYPES, f"must be one of {DTYPES}"),
            (
                "kv_cache_dtype",
                self.kv_cache_dtype in KV_CACHE_DTYPES,
                f"must be one of {KV_CACHE_DTYPES}",
            ),
            ("load_format", self.load_format in LOAD_FORMATS, f"must be one of {LOAD_FORMATS}"),
            (
                "quantization",
                self.quantization is None or self.quantization in QUANTIZATIONS,
                f"must be one of {QUANTIZATIONS}",
            ),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("block_size", self.block_size in (1, 2, 4, 8, 16, 32, 64), "must be a power of 2"),
            ("max_queued_requests", self.max_queued_requests >= 1, "must be >= 1"),
            (
                "gpu_memory_utilization",
                0.0 < self.gpu_memory_utilization <= 1.0,
                "must be in (0, 1]",
            ),
            (
                "kv_cache_memory",
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                "must be positive",
            ),
            (
                "max_model_len",
                self.max_model_len is None or self.max_model_len >= 1,
                "must be >= 1",
            ),
            (
                "long_prefill_token_threshold",
                self.long_prefill_token_threshold is None or self.long_prefill_token_threshold >= 0,
                "must be >= 0 (0: off)",
            ),
            ("max_num_partial_prefills", self.max_num_partial_prefills >= 1, "must be >= 1"),
            (
                "max_long_partial_prefills",
                1 <= self.max_long_partial_prefills <= self.max_num_partial_prefills,
                "must be >= 1 and <= --max-num-partial-prefills",
            ),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be >= 1"),
            (
                "nnodes",
                self.nnodes >= 1 and self.tensor_parallel_size % self.nnodes == 0,
                "must be >= 1 and divide --tensor-parallel-size",
            ),
            ("node_rank", 0 <= self.node_rank < self.nnodes, "must be in [0, --nnodes)"),
            (
                "distributed_init_method",
                self.nnodes == 1 or self.distributed_init_method is not None,
                "is required with --nnodes > 1 (tcp://HOST:PORT of node 0)",
            ),
            ("distributed_timeout", self.distributed_timeout > 0, "must be positive"),
            (
                "speculative_config",
                self.tensor_parallel_size == 1
                or self.speculative_config is None
                or self.speculative_config.method == NGRAM,
                "with a draft model needs --tensor-parallel-size 1 (ngram works with any)",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {why}, got {getattr(self, name)!r}")

    def prefill_limits(self) -> PrefillLimits:
        """The fair-prefill limits; by default a long prompt takes at most half of a
        contended step's budget, so the default server admits new requests beside it."""
        threshold = self.long_prefill_token_threshold
        if threshold is None:
            threshold = max(1, self.max_num_batched_tokens // DEFAULT_LONG_PREFILL_SHARE)
        return PrefillLimits(
            threshold, self.max_num_partial_prefills, self.max_long_partial_prefills
        )
