"""The decode layers compiled in a child process, loaded here without the compiler.

Compiling in the serving process imports dynamo, inductor and sympy (~885 modules, ~200 MiB
of RSS that never goes back). A child process loads the same model, compiles the whole-layer
graphs for caches shaped as this engine's (model/compiled_layers.py) and records them
(`CompiledLayers.record`); this process then loads the generated C++ modules and calls them
(model/layer_graphs.py), checked against the child's own result of one call per graph.

    python -m gemma_serve.server.engine.layer_compiler DIRECTORY   # the child: reads
    DIRECTORY/job.json (the engine configuration, every layer's cache shape, the longest
    context), writes DIRECTORY/graphs.json and reference.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from gemma_serve.server.engine.config import EngineConfig

# Seconds the child may take (a first compile takes ~10-20 s on 2 cores).
TIMEOUT_S = 600


@dataclass(frozen=True)
class Job:
    """What the child compiles for."""

    config: EngineConfig
    caches: list[tuple[tuple[int, ...], str]]  # per layer: the K/V tensors' shape and dtype
    max_keys: int  # the longest context: the global layers' most keys
    cache_dir: Path  # inductor's

    def write(self, path: Path) -> None:
        """As JSON (the configuration's model fields: no speculation)."""
        config = dataclasses.asdict(dataclasses.replace(self.config, speculative_config=None))
        fields = {"caches": self.caches, "max_keys": self.max_keys}
        path.write_text(json.dumps({"config": config, **fields, "cache_dir": str(self.cache_dir)}))

    @classmethod
    def read(cls, path: Path) -> Job:
        job = json.loads(path.read_text())
        caches = [(tuple(shape), dtype) for shape, dtype in job["caches"]]
        return cls(EngineConfig(**job["config"]), caches, job["max_keys"], Path(job["cache_dir"]))


def compile_in_child(job: Job, directory: Path) -> None:
    """Run the child on `job`; its records land in `directory`. Raises RuntimeError with the
    end of the child's output if it fails."""
    job.write(directory / "job.json")
    cmd = [sys.executable, "-m", "gemma_serve.server.engine.layer_compiler", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"the compiling process failed: {done.stderr[-2000:]}")


def _caches(job: Job) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed K and V tensors shaped as each layer's (one pair per shape; K and V separate
    allocations, as in KVCache)."""
    pairs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for shape, dtype in job.caches:
        if (shape, dtype) not in pairs:
            k, v = (torch.zeros(shape, dtype=getattr(torch, dtype)) for _ in "kv")
            pairs[shape, dtype] = (k, v)
    return [pairs[shape, dtype] for shape, dtype in job.caches]


def main(argv: list[str]) -> int:
    from gemma_serve.model.compiled_layers import CompiledLayers
    from gemma_serve.server.engine import model_source
    from gemma_serve.server.engine.cache_attention import row_caches

    directory = Path(argv[0])
    job = Job.read(directory / "job.json")
    loaded = model_source.load(job.config)
    layers = CompiledLayers(loaded.model, job.cache_dir)
    layers.compile(row_caches(loaded.config, _caches(job)), job.max_keys)
    layers.record(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
