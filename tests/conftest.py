"""Test session set-up: Triton's interpreter on CPU (set before triton is first imported)."""

import os

if not os.environ.get("GEMMA_SERVE_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.manual_seed(0)
