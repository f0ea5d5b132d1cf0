"""benchmarks/kernels.py end to end on CPU (interpreted kernels, eager flex_attention), so the
script a GPU run depends on cannot break unnoticed; its timings here mean nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import kernels as bench


@pytest.mark.slow
def test_kernel_benchmark_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k.json"
    argv = ["--device", "cpu", "--tiny", "--models", "gemma2-9b", "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert doc["copy_gb_per_s"] > 0
    assert not [r for r in rows if "error" in r], rows
    prefill = [r for r in rows if r["op"] == "prefill"]
    decode = [r for r in rows if r["op"] == "decode"]
    # Every config of each op, for a window shorter than the sequences and for none.
    per_window = 1 + len(bench.PREFILL_VARIANTS[256]) + 1  # default, variants, flex
    assert sorted({r["window"] for r in prefill}, key=str) == [16, None]
    assert len(prefill) == 2 * per_window
    assert len(decode) == 1 + len(bench.DECODE_VARIANTS)
    assert sum(r["config"] == "flex_attention" for r in prefill) == 2
    # Each config computed the reference's function (bf16 reference: ~4e-3 apart).
    for r in prefill + decode:
        assert 0 < r["rel_err"] < 2e-2, r
        assert r["ms"] > 0
    (store,) = [r for r in rows if r["op"] == "store_kv"]
    assert store["exact"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:3] == ["op", "model", "window"]  # the header, then one per row
    ops = [line.split()[0] for line in printed[2:] if line.strip()]
    assert sum(op in ("prefill", "decode", "store_kv") for op in ops) == len(rows)
