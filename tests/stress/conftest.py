"""Shared by the stress tests: one tiny checkpoint and its expected results, one torch thread
(no API key from the environment: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.engine_helpers import tiny_checkpoint, tiny_engine
from tests.stress.workload import Oracle


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("stress-tiny"), seed=7)


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are too small to gain from intra-op threads, and here the engine
    shares two cores with uvicorn's loop and the clients: spinning OpenMP workers then make
    every step several times slower. Restored afterwards for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def oracle(checkpoint: Path) -> Oracle:
    """Expected greedy results, each spec served alone offline (shared by the tests)."""
    return Oracle(tiny_engine(checkpoint))
