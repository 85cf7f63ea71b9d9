"""The type check in CI: mypy over the packages that pyproject.toml's [tool.mypy] names (metattt/ttt, metattt/eval and
what they import). Why a test: the evaluator's seam is a typing.Protocol (metattt.eval.scoring.AdapterLike), and only
a type checker verifies that every registry adapter implements it and that the evaluator calls nothing beyond it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~35 s without mypy's cache (.mypy_cache), a few seconds with it

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_clean() -> None:
    pytest.importorskip("mypy.api", reason="mypy is not installed (it is in the dev extra: pip install -e '.[dev]')")
    # the repo root: mypy reads [tool.mypy] (files, overrides) from its pyproject.toml
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, f"mypy found problems (exit {r.returncode}):\n{out}"
    assert out.startswith("Success: no issues found"), out
