"""The installed project is one import name: the wheel holds gemma_serve/... and nothing else."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_only_under_gemma_serve(tmp_path: Path) -> None:
    # Built from a copy: setuptools would otherwise leave a build/ folder in the checkout, whose
    # stale copies of removed modules later wheels would pick up.
    src = tmp_path / "src"
    for name in ("model", "kernels", "server"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gemma_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gemma_serve"}
    for sub in ("model/gemma.py", "server/cli.py", "server/engine/llm_engine.py"):
        assert f"gemma_serve/{sub}" in names
    assert "gemma_serve/kernels/reference.py" in names
    # An implicit namespace package: no gemma_serve/__init__.py to collide with.
    assert "gemma_serve/__init__.py" not in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    assert "gemma-serve = gemma_serve.server.cli:main" in scripts
