"""Test session set-up: Triton's interpreter on CPU (set before triton is first imported), and
no API key from the environment."""

import os
from collections.abc import Iterator

if not os.environ.get("GEMMA_SERVE_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from gemma_serve.server.state import API_KEY_ENV  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _no_api_key_from_the_environment() -> Iterator[None]:
    """A developer's own GEMMA_SERVE_API_KEY would otherwise lock every test server (those in
    this process and the subprocesses, which inherit the environment). Tests that need a key
    set one themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(API_KEY_ENV, raising=False)
        yield
