"""Security basics: the API key (constant-time, deny by default), model paths only from the
command line, no pickle-based loading anywhere, CORS off unless asked for."""

from __future__ import annotations

import ast
import hmac
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gemma_serve.server import middleware
from gemma_serve.server.app import Settings, create_app
from gemma_serve.server.cli import parse_args

from tests.fake_engine import FakeEngine
from tests.server_helpers import run_server

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Modules that deserialize by running code (pickle and friends) and loaders built on them.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal"}
UNSAFE_MODULES |= {"shelve"}
UNSAFE_CALLS = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("torch", "serialization")}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, list[int]]]:
    """A server with an API key; yields its URL and how many times the engine was built."""
    built: list[int] = []

    def provider() -> FakeEngine:
        built.append(1)
        return FakeEngine()

    with run_server(create_app(provider, Settings(api_key=KEY))) as url:
        yield url, built


PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/fake-gemma"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/tokenize/"),  # a trailing slash must not slip past the gate
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/v1"),
    ("GET", "/no-such-route"),
    ("GET", "/health/"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_everything_but_health_and_metrics_needs_the_key(
    keyed: tuple[str, list[int]], method: str, path: str
) -> None:
    url, _ = keyed
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}]:
        r = httpx.request(method, f"{url}{path}", headers=headers, json={}, timeout=10)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.request(method, f"{url}{path}", headers=AUTH, json={}, timeout=10)
    assert r.status_code != 401


def test_health_and_metrics_stay_open(keyed: tuple[str, list[int]]) -> None:
    url, _ = keyed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200


def test_the_key_is_compared_in_constant_time(
    keyed: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = keyed
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    for token, status in [("wrong", 401), (KEY[:-1], 401), (KEY + "x", 401), (KEY, 200)]:
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
        assert r.status_code == status
    assert calls == [(t.encode(), KEY.encode()) for t in ("wrong", KEY[:-1], KEY + "x", KEY)]


@pytest.mark.parametrize(
    "model",
    [str(ROOT / "tests"), "/etc/passwd", "../../model", "gemma-2-9b", "https://example.com/m"],
)
def test_the_model_field_never_loads_anything(keyed: tuple[str, list[int]], model: str) -> None:
    url, built = keyed
    body = {"model": model, "prompt": "ab", "max_tokens": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{url}/v1/models/{model.lstrip('/')}", headers=AUTH, timeout=10)
    assert r.status_code == 404
    assert built == [1]  # the engine was built once, at start-up, from the command line


def unsafe_uses(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every import of an unsafe module and every unsafe loader call."""
    unsafe = UNSAFE_MODULES | {f"{m}.{f}" for m, f in UNSAFE_CALLS}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        else:
            continue
        found += [(node.lineno, n) for n in names if n in unsafe]
    return found


def test_no_pickle_based_loading_in_the_server_or_the_model() -> None:
    # Weights come from safetensors or GGUF only; torch.load / pickle can run arbitrary code.
    files = [
        f for package in ("server", "model", "kernels") for f in (ROOT / package).rglob("*.py")
    ]
    assert len(files) > 20
    uses = [f"{f.relative_to(ROOT)}:{line}: {name}" for f in files for line, name in unsafe_uses(f)]
    assert uses == []


def test_the_scanner_finds_unsafe_loading(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nimport torch\nfrom numpy import load\ntorch.load('x')\n")
    assert unsafe_uses(sample) == [(1, "pickle"), (3, "numpy.load"), (4, "torch.load")]


def test_cors_is_off_by_default() -> None:
    assert parse_args([])[1].settings.allowed_origins == ()
    assert parse_args(["--allowed-origins", "http://ui"])[1].settings.allowed_origins == (
        "http://ui",
    )
    with run_server(create_app(FakeEngine)) as url:
        r = httpx.get(f"{url}/health", headers={"Origin": "http://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in r.headers
