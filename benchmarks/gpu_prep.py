"""Prepare, on this machine, what benchmarks/gpu.sh needs on a GPU machine that has no network.

The GPU image has torch, triton, transformers, sentencepiece, safetensors, httpx and pytest, but
not the server's web stack, and the presets borrow the embedded default model's tokenizer, whose
package (253 MB of GGUF) is too large to carry. This writes, under DIR (default .gpu/, ignored
by git):

    DIR/whl/*.whl                     the web stack (fastapi, starlette, pydantic, uvicorn, ...)
                                      as wheels for the GPU image's CPython (3.12 by default),
                                      at the versions installed here
    DIR/models/<preset>/config.json   each preset as a Hugging Face directory, served with
    DIR/models/<preset>/tokenizer.model   --load-format dummy (random weights of its shape)

    python -m benchmarks.gpu_prep [--dir .gpu] [--python-version 3.12]

gpu.sh installs DIR/whl into a private folder and serves DIR/models/<preset> when they exist.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# The server's runtime packages the GPU image lacks (or may hold at versions too old for them).
WHEELS = (
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "typing_extensions",
    "uvicorn",
    "anyio",
    "opentelemetry-api",  # fastapi >= 0.16x requires it
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(dest: Path, python_version: str) -> list[Path]:
    """Binary wheels of WHEELS (this environment's versions) for CPython `python_version`."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + pins, check=True)
    return sorted(dest.glob("*.whl"))


def write_presets(dest: Path, tokenizer: Path) -> list[Path]:
    """One Hugging Face directory (config.json + tokenizer.model) per preset."""
    from gemma_serve.model.config import PRESETS

    dirs = []
    for name, cfg in PRESETS.items():
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        shutil.copy(tokenizer, d / "tokenizer.model")
        dirs.append(d)
    return dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".gpu"))
    parser.add_argument("--python-version", default="3.12", help="the GPU image's CPython")
    args = parser.parse_args(argv)
    from gemma_serve.model.default_model import default_model_dir

    wheels = download_wheels(args.dir / "whl", args.python_version)
    dirs = write_presets(args.dir / "models", default_model_dir() / "tokenizer.model")
    size = sum(f.stat().st_size for f in args.dir.rglob("*") if f.is_file())
    print(f"{len(wheels)} wheels, {len(dirs)} preset directories, {size / 2**20:.1f} MiB "
          f"under {args.dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
