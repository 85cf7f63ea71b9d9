from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from metattt.track import MalformedRunDir, RunDir, to_jsonable


@dataclasses.dataclass
class _Cfg:
    lr: float
    dims: tuple[int, ...]
    out: Path


def test_create_writes_config_env_and_roundtrips(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "r1", _Cfg(0.1, (1, 2), Path("/x/y")), rank=0)
    assert run.path == tmp_path / "r1" and run.is_writer
    assert json.loads((run.path / "config.json").read_text()) == {"lr": 0.1, "dims": [1, 2], "out": "/x/y"}
    env = json.loads((run.path / "env.json").read_text())
    for key in ("git", "python", "numpy_version", "torch_version", "platform", "hostname", "world_size", "device"):
        assert key in env, key
    assert set(env["git"]) == {"commit", "dirty"}

    run.log_metrics({"step": 0, "time_s": 0.0, "kind": "train", "loss": 5.5})
    run.log_metrics({"step": 10, "time_s": 1.5, "kind": "val", "val_bpb": float("nan"), "x": float("-inf")})
    run.write_summary({"final_val_bpb": 1.25, "diverged": float("inf")})
    run.write_json("eval.json", {"ttt_delta": -0.01})

    # Strict JSON on disk: no bare NaN/Infinity tokens.
    for line in (run.path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    back = RunDir.open(run.path)
    assert back.config == {"lr": 0.1, "dims": [1, 2], "out": "/x/y"}
    assert back.summary["final_val_bpb"] == 1.25 and back.summary["diverged"] == math.inf
    assert back.eval == {"ttt_delta": -0.01}
    recs = back.metrics()
    assert [r["step"] for r in recs] == [0, 10]
    assert math.isnan(recs[1]["val_bpb"]) and recs[1]["x"] == -math.inf
    assert [r["step"] for r in back.metrics(kind="val")] == [10]
    assert not list(run.path.glob("*.tmp")), "atomic writes must leave no temporary files"


def test_unique_names_and_exist_ok(tmp_path: Path) -> None:
    a = RunDir.create(tmp_path, None, {"a": 1}, rank=0)
    b = RunDir.create(tmp_path, None, {"a": 2}, rank=0)
    assert a.path != b.path and a.path.parent == tmp_path
    with pytest.raises(FileExistsError):
        RunDir.create(tmp_path, a.name, {}, rank=0)
    a.log_metrics({"step": 1})
    again = RunDir.create(tmp_path, a.name, {"a": 3}, rank=0, exist_ok=True)
    again.log_metrics({"step": 2})
    assert [r["step"] for r in RunDir.open(a.path).metrics()] == [1, 2]
    assert RunDir.open(a.path).config == {"a": 3}
    with pytest.raises(ValueError, match="single"):
        RunDir.create(tmp_path, "../escape", {}, rank=0)


def test_nonzero_rank_writes_nothing(tmp_path: Path) -> None:
    r = RunDir.create(tmp_path, "shared", {"a": 1}, rank=1)
    assert not r.is_writer and r.path == tmp_path / "shared"
    r.log_metrics({"step": 0})
    r.write_summary({"x": 1})
    assert r.write_json("eval.json", {}) is None
    assert not (tmp_path / "shared").exists()
    assert RunDir.create(tmp_path, None, {}, rank=3).path is None


def test_env_rank_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    assert not RunDir.create(tmp_path, "x", {}).is_writer
    monkeypatch.setenv("RANK", "0")
    assert RunDir.create(tmp_path, "x", {}).is_writer


def test_unserializable_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\$\.opt\.fn"):
        RunDir.create(tmp_path, "bad", {"opt": {"fn": object()}}, rank=0)
    assert not (tmp_path / "bad").exists(), "no half-created directory on a bad config"
    assert to_jsonable({"s": {3, 1}, 1: float("nan")}) == {"s": [1, 3], "1": "NaN"}


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda p: None, "not a directory"),
        (lambda p: p.mkdir(), "none of"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "config.json is not valid JSON"),
        (lambda p: (p.mkdir(), (p / "eval.json").write_text("[1, 2]")), "eval.json holds a list"),
        (lambda p: (p.mkdir(), (p / "summary.json").write_text('{"a": 1}\n{"b": 2}')), "summary.json is not valid"),
    ],
)
def test_malformed_open(tmp_path: Path, setup, reason: str) -> None:
    p = tmp_path / "run"
    setup(p)
    with pytest.raises(MalformedRunDir, match=reason) as ei:
        RunDir.open(p)
    assert ei.value.path == p and reason in ei.value.reason


def test_malformed_metrics_line_is_named(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "m", {}, rank=0)
    run.log_metrics({"step": 0})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "trunc\n')
    with pytest.raises(MalformedRunDir, match="line 2"):
        RunDir.open(run.path).metrics()
