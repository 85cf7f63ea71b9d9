"""The schedule horizon of stateful evaluation (issue 29): ``--schedule-horizon`` indexes an adapter's schedule to a
longer stream than the one scored, so a val prefix decays sgd's cosine lr as the full val would."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metattt.eval.protocols import EvalConfig
from metattt.eval.run import main
from metattt.eval.scoring import FULL_VAL_TOKENS, ScoreConfig, parse_horizon, run_stream, schedule_progress
from metattt.eval.windows import sliding_plan
from metattt.model.gpt import BankedGPT
from metattt.ttt.registry import make_adapter
from tiny import tiny_config


def _stream(n_docs: int = 12, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    parts = [np.concatenate(([1], rng.integers(4, 64, size=int(rng.integers(40, 120))))) for _ in range(n_docs)]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def _run(horizon: int | None):
    torch.manual_seed(0)
    model = BankedGPT(tiny_config()).eval()
    toks = _stream()
    plan = sliding_plan(toks.numel(), 32, 8)
    sgd = make_adapter("sgd", lr=0.05, epochs=1, momentum=0.0, schedule="cosine").bind(model)
    cfg = ScoreConfig(batch_tokens=1024, chunk_tokens=128, schedule_horizon=horizon)
    return toks, run_stream(model, toks, plan, cfg, adapter=sgd, order="score_first")


def test_progress_default_and_horizons():
    assert [schedule_progress(i, 5, 1000) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # the stream's own length as the horizon is the default, bit for bit
    for n_chunks in (1, 2, 3, 32, 1893):
        for i in range(n_chunks):
            assert schedule_progress(i, n_chunks, 1_040_298, 1_040_298) == schedule_progress(i, n_chunks, 1_040_298)
    # 32 chunks of a 1,040,298-token prefix against the full val: the last chunk is ~2% into the schedule
    last = schedule_progress(31, 32, 1_040_298, FULL_VAL_TOKENS)
    assert last == pytest.approx(31 / (32 * FULL_VAL_TOKENS / 1_040_298 - 1)) and 0.015 < last < 0.02
    assert schedule_progress(9, 10, 1000, 500) == 1.0  # a horizon shorter than the stream ends the schedule early


def test_horizon_equal_to_stream_is_identical_and_longer_keeps_lr_higher():
    toks, base = _run(None)
    _, same = _run(int(toks.numel()))
    _, full = _run(FULL_VAL_TOKENS)
    assert len(base.adapt_stats) >= 5
    assert np.array_equal(base.token_nll, same.token_nll)
    assert [s["lr"] for s in base.adapt_stats] == [s["lr"] for s in same.adapt_stats]
    lr0 = [s["lr"] for s in base.adapt_stats]
    lr1 = [s["lr"] for s in full.adapt_stats]
    assert lr0[0] == lr1[0] == pytest.approx(0.05)  # both start at the full lr
    assert all(b > a for a, b in zip(lr0[1:], lr1[1:]))  # the default decays over the short stream
    assert lr1[-1] > 0.0499 and lr0[-1] < 0.01
    assert not np.array_equal(base.token_nll, full.token_nll)  # a different schedule scores differently


def test_parse_and_cli_errors(tmp_path, capsys):
    assert parse_horizon("full") == FULL_VAL_TOKENS and parse_horizon("none") is None
    assert parse_horizon("1_040_298") == parse_horizon("1,040,298") == 1_040_298
    for bad in ("abc", "1", "-5"):
        with pytest.raises(ValueError):
            parse_horizon(bad)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "a.ptz"), "--schedule-horizon", "lots"])
    assert e.value.code == 2 and "--schedule-horizon" in capsys.readouterr().err
    assert EvalConfig(schedule_horizon=5000).score_config().schedule_horizon == 5000
    assert dataclasses.asdict(EvalConfig())["schedule_horizon"] is None  # recorded in eval.json's config
