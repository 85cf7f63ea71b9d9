from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metattt.track import wandb_log
from metattt.track.compare import CompareError, load_wandb_runs
from metattt.track.wandb_log import WandbLogger, WandbUnavailable, api_key_configured, resolve_wandb_mode

REPO = Path(__file__).resolve().parents[1]
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture()
def no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError


@pytest.fixture()
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wandb_log, "_import_wandb", lambda: object())


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), **extra}


def test_mode_resolution_without_wandb(no_wandb, tmp_path: Path) -> None:
    env = _env(tmp_path, WANDB_API_KEY="x" * 40)
    assert resolve_wandb_mode(None, env) == "off"
    assert resolve_wandb_mode("off", env) == "off"
    assert resolve_wandb_mode("disabled", env) == "off"
    for mode in ("online", "offline"):
        with pytest.raises(WandbUnavailable, match="not installed.*pip install wandb"):
            resolve_wandb_mode(mode, env)
    with pytest.raises(WandbUnavailable, match="env WANDB_MODE"):
        resolve_wandb_mode(None, _env(tmp_path, WANDB_MODE="online"))
    with pytest.raises(ValueError, match="not one of"):
        resolve_wandb_mode("sometimes", env)
    logger = WandbLogger(None, project="p", config={"a": 1}, run_dir=tmp_path / "run")
    assert logger.mode == "off" and not logger.enabled
    logger.log({"x": 1.0}, step=0)
    logger.summary({"x": 1})
    logger.log_table("t", ["a"], [[1]])
    logger.finish()
    assert not (tmp_path / "run").exists(), "an off logger touches nothing"
    with pytest.raises(CompareError, match="needs wandb"):
        load_wandb_runs("proj")


def test_mode_resolution_with_wandb(fake_wandb, tmp_path: Path) -> None:
    assert resolve_wandb_mode(None, _env(tmp_path)) == "offline"
    assert resolve_wandb_mode(None, _env(tmp_path, WANDB_API_KEY="k")) == "online"
    assert resolve_wandb_mode(None, _env(tmp_path, WANDB_MODE="disabled")) == "off"
    assert resolve_wandb_mode("offline", _env(tmp_path, WANDB_API_KEY="k")) == "offline"
    # netrc entry for the wandb host counts as a configured key; another host does not.
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.org login u password p\n")
    assert not api_key_configured(_env(tmp_path))
    netrc.write_text("machine api.wandb.ai login user password pw\n")
    assert api_key_configured(_env(tmp_path))
    assert resolve_wandb_mode(None, _env(tmp_path)) == "online"
    assert not api_key_configured(_env(tmp_path, WANDB_BASE_URL="https://wandb.example.com"))
    # Non-zero ranks never log, even when asked explicitly.
    assert WandbLogger("online", rank=1).mode == "off"


def test_compare_wandb_without_key_explains_offline(fake_wandb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "nonexistent-netrc"))
    with pytest.raises(CompareError, match="offline runs pass their run directories"):
        load_wandb_runs("proj")


def test_offline_logging_writes_into_run_dir(tmp_path: Path) -> None:
    if not HAVE_WANDB:
        pytest.skip("wandb not installed (extra 'wandb')")
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        from metattt.track import RunDir, WandbLogger
        run = RunDir.create({str(tmp_path)!r}, "run", {{"lr": 0.1}}, rank=0)
        with WandbLogger(None, project="metattt-test", group="g", tags=["t"], config={{"lr": 0.1}},
                         run_dir=run.path) as wb:
            assert wb.mode == "offline", wb.mode
            wb.log({{"loss": 1.5, "val_bpb": float("nan")}}, step=1)
            wb.summary({{"final_bpb": 1.2}})
            wb.log_table("protocols", ["protocol", "bpb"], [["sliding", 1.2], ["ttt", 1.1]])
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list(run_dir.rglob("*"))
    data = list(offline[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    assert list(offline[0].rglob("protocols*.table.json")), "the table is stored with the offline run"
    assert (run_dir / "config.json").exists(), "our own files sit beside wandb's"
