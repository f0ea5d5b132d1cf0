"""Resolve --model / --load-format / --device / --dtype into a loaded model and tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from gemma_serve.model import int8_cache
from gemma_serve.model.config import PRESETS, ModelConfig, preset
from gemma_serve.model.deploy import Deployment, check, deploy, install_int8, int8_state
from gemma_serve.model.gemma import GemmaForCausalLM
from gemma_serve.model.loader import load_safetensors, meta_model, random_model
from gemma_serve.model.parallel import TensorGroup, load_shard
from gemma_serve.model.shard_plan import ShardPlan
from gemma_serve.model.tokenizer import Tokenizer
from gemma_serve.server.engine.config import EngineConfig

if TYPE_CHECKING:
    from gemma_serve.server.engine.tp_workers import WorkerGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tensor-parallel rank: its device and the group its collectives go through."""

    group: TensorGroup
    device: torch.device

    def load(
        self, cfg: ModelConfig, dtype: torch.dtype, model_dir: Path | None, seed: int
    ) -> GemmaForCausalLM:
        plan = ShardPlan.build(cfg, self.group.rank, self.group.size)
        return load_shard(cfg, plan, self.group, dtype, self.device, model_dir, seed)


@dataclass(frozen=True)
class LoadedModel:
    model: GemmaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    device: torch.device
    dtype: torch.dtype
    deployment: Deployment
    workers: WorkerGroup | None = None  # rank 0 under tensor parallelism: the other ranks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (fp16 overflows in Gemma), fp32 on CPUs (bf16 matmul is slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def resolve_quantization(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> str:
    """--quantization, or by default int8 where it is the fast mode that meets the fidelity
    bound (the embedded model and GGUF checkpoints, already quantised, on CPU in fp32).
    Tensor parallelism shards float weights only: int8 is refused there, and not the default."""
    if cfg.quantization is not None:
        check(cfg.quantization, device, dtype)
        if cfg.quantization == "int8" and cfg.tensor_parallel_size > 1:
            raise ValueError(
                "--quantization int8 cannot be sharded: use --quantization none with "
                "--tensor-parallel-size > 1"
            )
        return cfg.quantization
    if cfg.tensor_parallel_size > 1:
        return "none"
    gguf = cfg.model is None or Path(cfg.model).suffix == ".gguf" or cfg.load_format == "gguf"
    try:
        check("int8", device, dtype)
    except ValueError:
        return "none"
    return "int8" if gguf else "none"


def _model_dir(cfg: EngineConfig) -> tuple[Path, str, bool]:
    """A HF-style directory to load, the default served name, and whether the directory is
    our own conversion cache (where a derived int8 layout may be cached too)."""
    if cfg.model is None:
        from gemma_serve.model.default_model import DEFAULT_MODEL_NAME, default_model_dir

        return default_model_dir(), DEFAULT_MODEL_NAME, True
    path = Path(cfg.model)
    if path.suffix == ".gguf" or cfg.load_format == "gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from gemma_serve.model.gguf_convert import cached_conversion

        return cached_conversion(path), path.stem, True
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {cfg.model!r} is neither a directory, a .gguf file nor a preset "
            f"({', '.join(PRESETS)})"
        )
    return path, path.name, False


def _load_int8(
    model_dir: Path, mcfg: ModelConfig, cache: bool
) -> tuple[GemmaForCausalLM, Deployment]:
    """The int8 model, from the conversion cache's int8 layout when there is one (no fp32
    weights are read), else quantised from the fp32 checkpoint (and cached when `cache`, then
    served from the cache's map as later starts are)."""
    path = model_dir / int8_cache.FILE_NAME
    mapped = int8_cache.load(path) if cache else None
    if mapped is not None:
        model = meta_model(mcfg)
        try:
            return model, _install_mapped(model, mapped, from_cache=True)
        except (KeyError, RuntimeError) as exc:
            log.warning("int8 cache %s does not fit the model (%s): rebuilding it", path, exc)
    model = load_safetensors(model_dir, mcfg, torch.float32, torch.device("cpu"))
    state = int8_state(model)
    mapped = None
    if cache:
        try:
            int8_cache.save(path, state)
        except OSError as exc:  # a read-only cache still serves, only slower to start
            log.warning("could not write the int8 cache %s: %s", path, exc)
        else:
            mapped = int8_cache.load(path)
    if mapped is None:
        return model, Deployment("int8", install_int8(model, state))
    del state  # the map serves the rows: the quantised copies go before packing
    return model, _install_mapped(model, mapped)


def _install_mapped(
    model: GemmaForCausalLM, mapped: int8_cache.Mapped, from_cache: bool = False
) -> Deployment:
    linear = install_int8(model, mapped.tensors)
    mapped.evict()  # the pages packing read; the plain rows fault back in as used
    return Deployment("int8", linear, from_cache=from_cache)


def prepare(cfg: EngineConfig) -> None:
    """Convert a GGUF (or the embedded model) into its cached directory now: the process that
    starts the tensor-parallel ranks does it once, before they all load from it."""
    if cfg.model not in PRESETS:
        _model_dir(cfg)


def _default_tokenizer() -> Tokenizer:
    from gemma_serve.model.default_model import default_model_dir

    return Tokenizer.from_file(default_model_dir() / "tokenizer.model")


def load(cfg: EngineConfig, shard: Shard | None = None) -> LoadedModel:
    """The model of `cfg`, or with `shard` only one tensor-parallel rank's slice of it (on
    the shard's device)."""
    device = shard.device if shard is not None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quantization = resolve_quantization(cfg, device, dtype)
    deployment: Deployment | None = None  # set when loading already deployed the model
    if cfg.model in PRESETS:
        if cfg.load_format != "dummy":
            raise ValueError(
                f"preset {cfg.model!r} has no weights here: use --load-format dummy "
                "(random weights of its shape) or pass a checkpoint directory"
            )
        mcfg = preset(cfg.model)
        if shard is not None:
            model = shard.load(mcfg, dtype, None, cfg.seed)
        else:
            model = random_model(mcfg, dtype, device, cfg.seed)
        # Presets carry no tokenizer: borrow the embedded model's (text benchmarks only).
        tokenizer = _default_tokenizer()
        name = cfg.model
    else:
        model_dir, name, converted = _model_dir(cfg)
        mcfg = ModelConfig.from_file(model_dir)
        tokenizer = Tokenizer.from_file(model_dir / "tokenizer.model")
        if shard is not None:
            weights = None if cfg.load_format == "dummy" else model_dir
            model = shard.load(mcfg, dtype, weights, cfg.seed)
        elif cfg.load_format != "dummy" and quantization == "int8":
            model, deployment = _load_int8(model_dir, mcfg, cache=converted)
        elif cfg.load_format == "dummy":
            model = random_model(mcfg, dtype, device, cfg.seed)
        else:
            model = load_safetensors(model_dir, mcfg, dtype, device)
    if deployment is None:
        deployment = deploy(model, device, dtype, quantization, cfg.pack_cpu_weights)
    log.info(
        "loaded %s (%s) on %s in %s, quantization %s (linear layers: %s%s)",
        name, mcfg.model_type, device, dtype, deployment.quantization, deployment.linear,
        ", from the int8 cache" if deployment.from_cache else "",
    )  # fmt: skip
    return LoadedModel(
        model, mcfg, tokenizer, cfg.served_model_name or name, device, dtype, deployment
    )
