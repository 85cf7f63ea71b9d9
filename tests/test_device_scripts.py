"""The committed device-call scripts (experiments/ladder_rung.sh, benchmarks/record_fidelity.sh,
benchmarks/step_rate_ratio.sh) parse and refuse
bad input with exit 2 and a message before they touch data or the GPU; their full runs are device work."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["experiments/ladder_rung.sh", "benchmarks/record_fidelity.sh", "benchmarks/step_rate_ratio.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path), **env})


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script: str, tmp_path: Path) -> None:
    assert _run(["-n", script], tmp_path).returncode == 0


def test_ladder_rung_refuses_an_unknown_size(tmp_path: Path) -> None:
    r = _run(["experiments/ladder_rung.sh", "3m", "60"], tmp_path, METATTT_DATA=str(tmp_path))
    assert r.returncode == 2 and "no model ladder-3m.wsd" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_record_fidelity_needs_the_record_script(tmp_path: Path) -> None:
    r = _run(["benchmarks/record_fidelity.sh", "7", "150", str(tmp_path / "absent.py")], tmp_path,
             METATTT_DATA=str(tmp_path))
    assert r.returncode == 2 and "no record script" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,branches", [("2m", "ladder-2m.dn25 ladder-2m.dn50 ladder-2m.dn100"),
                                           ("4m", "ladder-4m.dn12.5 ladder-4m.dn25 ladder-4m.dn50"),
                                           ("8m", "ladder-8m.dn6.25 ladder-8m.dn12.5 ladder-8m.dn25")])
def test_ladder_rung_plans_every_first_seed_branch(size: str, branches: str, tmp_path: Path) -> None:
    """Budgets with decimals (dn12.5, dn6.25) are branches too: an earlier pattern matched only whole numbers and
    would have skipped them on the device."""
    r = _run(["experiments/ladder_rung.sh", size, "--plan"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"parent: ladder-{size}.wsd", f"branches: {branches}"]


def test_ladder_rung_refuses_a_bad_time_budget(tmp_path: Path) -> None:
    r = _run(["experiments/ladder_rung.sh", "2m", "9m"], tmp_path, METATTT_DATA=str(tmp_path))
    assert r.returncode == 2 and "SECONDS must be a whole number" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [(["compile", "5"], "RECORD_STEPS must be a whole number >= 10"),
                                          (["compile", "ten"], "RECORD_STEPS must be a whole number >= 10"),
                                          (["compile", "40", "absent.py"], "no record script")])
def test_step_rate_ratio_refuses_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    if args[-1] == "absent.py":
        args = args[:-1] + [str(tmp_path / "absent.py")]
    r = _run(["benchmarks/step_rate_ratio.sh", *args], tmp_path, METATTT_DATA=str(tmp_path))
    assert r.returncode == 2 and message in r.stderr
    assert list(tmp_path.iterdir()) == []
