"""How many bytes the KV cache gets when no flag says, and whether the host can back them.

On CUDA: --gpu-memory-utilization of the device, less what is in use and a reserve for
activations. On CPU: the KV of CPU_KV_TOKENS tokens at every layer, at most CPU_KV_BUDGET;
the cache is zeroed at start-up (kv_cache.py), so that is resident memory from the first
second, and a budget the host or the container's limit cannot back is refused here rather
than ending in the OOM killer later.
"""

from __future__ import annotations

import torch
from gemma_serve.server.engine import host_memory, model_source
from gemma_serve.server.engine.config import EngineConfig
from gemma_serve.server.engine.kv_cache import kv_bytes_per_token

CPU_KV_TOKENS = 16384
CPU_KV_BUDGET = 2 << 30
# Host memory left free beside a CPU KV cache (activations, Python, the HTTP side).
CPU_KV_RESERVE = 256 << 20


def default_budget(
    config: EngineConfig, loaded: model_source.LoadedModel, kv_dtype: torch.dtype, use_graphs: bool
) -> int:
    """The KV budget in bytes when --kv-cache-memory is not given (this rank's KV heads, in
    the cache's dtype)."""
    mcfg = loaded.model.config
    per_token = kv_bytes_per_token(mcfg, kv_dtype)
    context = config.max_model_len or mcfg.max_position_embeddings
    worst = config.max_num_seqs * context * per_token
    if loaded.device.type != "cuda":
        return min(CPU_KV_BUDGET, CPU_KV_TOKENS * per_token, worst)
    free, total = torch.cuda.mem_get_info(loaded.device)
    reserve = (1 << 30) + config.max_num_batched_tokens * mcfg.intermediate_size * 16
    if use_graphs:  # the decode graphs' fp32 logits, all buckets together
        reserve += 2 * config.max_num_seqs * mcfg.vocab_size * 4
    return max(0, int(total * config.gpu_memory_utilization) - (total - free) - reserve)


def check_host_memory(kv_bytes: int) -> None:
    """Refuses a CPU KV cache the host cannot back (it is zeroed, so all resident)."""
    available = host_memory.available_bytes()
    if available is not None and kv_bytes + CPU_KV_RESERVE > available:
        raise ValueError(
            f"the KV cache needs {kv_bytes / 2**20:.0f} MiB (+{CPU_KV_RESERVE >> 20} MiB "
            f"headroom) but only {available / 2**20:.0f} MiB of host memory is available: "
            "lower --kv-cache-memory"
        )
