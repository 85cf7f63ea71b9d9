"""Issue 28, the trainer's reliability gaps: a SIGINT / SIGTERM during training checkpoints and exits 130 / 143 in
one line, checkpoints are taken by default every few minutes, a resumed run is the same run (its own config, the
flags given with --resume on top), an unwritable run root is refused before any work."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from test_train import TINY


def _args(tmp: Path, *extra: str) -> list[str]:
    return [*TINY, "--data-dir", str(tmp / "syn"), "--run-root", str(tmp / "runs"), *extra]


def _main(argv):
    from metattt.train.cli import main

    return main(argv)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("sig, code, resume_flags, steps", [
    (signal.SIGINT, 130, [], 5),  # the saved config wins: 5 iterations, final eval off (the preset says 3000, short)
    (signal.SIGTERM, 143, ["--iterations", "6"], 6),  # a flag given with --resume overrides it
])
def test_signal_checkpoints_then_resume_is_the_same_run(tmp_path, capsys, monkeypatch, sig, code, resume_flags, steps):
    import metattt.train.final_eval as final_eval
    import metattt.train.loop as loop

    real = loop.lr_scale

    def signal_at_step_2(step, *a, **k):
        if step == 2:
            os.kill(os.getpid(), sig)
        return real(step, *a, **k)

    monkeypatch.setattr(loop, "lr_scale", signal_at_step_2)
    rc = _main(_args(tmp_path, "--iterations", "5", "--run-name", "r", "--final-eval", "off"))
    line = _one_line(capsys.readouterr().err)
    run = tmp_path / "runs" / "r"
    assert rc == code and "at step 3" in line and f"--resume {run}" in line
    assert torch.load(run / "checkpoint_r0.pt", weights_only=False)["step"] == 3  # the step under way finished
    assert not (run / "artifact.ptz").exists()

    monkeypatch.setattr(loop, "lr_scale", real)

    def no_final_eval(*a, **k):
        raise AssertionError("the resumed run evaluated although the run had --final-eval off")

    monkeypatch.setattr(final_eval, "run_final_eval", no_final_eval)
    assert _main(["--resume", str(run), "--progress", "false", *resume_flags]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    assert json.loads((run / "config.json").read_text())["iterations"] == steps


def test_checkpoints_are_taken_by_time_by_default(tmp_path, monkeypatch):
    import metattt.train.checkpoint as ckpt
    from metattt.train.cli import parse_config
    from metattt.train.config import PRESETS, preset

    assert all(0 < preset(n).checkpoint_every_s <= 600 for n in PRESETS)
    assert parse_config([]).checkpoint_every_s > 0
    saved: list[int] = []
    real = ckpt.save
    monkeypatch.setattr(ckpt, "save", lambda *a, **k: saved.append(k["step"]) or real(*a, **k))
    assert _main(_args(tmp_path, "--iterations", "3", "--run-name", "t", "--final-eval", "off",
                       "--checkpoint-every-s", "1e-9")) == 0
    assert saved == [0, 1, 2]


def test_unwritable_run_root_is_refused_before_any_work(tmp_path, capsys):
    """A path under a regular file: not creatable even by root (chmod does not stop root)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = _main(_args(tmp_path, "--iterations", "2", "--run-root", str(blocker / "runs")))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "not writable" in line and str(blocker) in line
    assert not (tmp_path / "syn").exists()  # no corpus generated either


def test_signal_outside_the_steps_is_one_line(tmp_path, capsys, monkeypatch):
    import metattt.train.loop as loop

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the trainer")

    monkeypatch.setattr(loop, "resolve_data", interrupted)
    old = signal.getsignal(signal.SIGTERM)
    rc = _main(_args(tmp_path, "--iterations", "2"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 143 and "interrupted (SIGTERM)" in line
    assert signal.getsignal(signal.SIGTERM) == old


def test_help_shows_each_presets_default_not_the_dataclass_default(monkeypatch):
    from metattt.train.cli import build_parser

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the help entries
    text = " ".join(build_parser().format_help().split())
    assert "tiny:" not in text  # used to show the plain dataclass default (iterations 400) as the tiny preset's
    assert "pg-2026-03-23: 20000; tiny-synthetic: 500)" in text


def test_a_wallclock_stop_between_log_steps_still_logs_the_last_step(tmp_path):
    """The progress line used to stop at the last multiple of the log interval (step 200 of 243)."""
    from metattt.train.cli import parse_config
    from metattt.train.loop import train

    summary = train(parse_config(_args(tmp_path, "--iterations", "1000", "--max-wallclock-s", "0.3",
                                       "--final-eval", "off", "--run-name", "w")))
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "w" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert 0 < summary["steps"] < 50 and train_rows[-1]["step"] == summary["steps"]
