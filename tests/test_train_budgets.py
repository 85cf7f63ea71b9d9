"""Warmup-stable-decay runs with token-budget checkpoints, the pass cap, and decay branches from a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metattt.train.budgets import plan_budgets
from metattt.train.cli import main, parse_config
from metattt.train.loop import train
from metattt.train.schedule import lr_scale

from test_train import _args, _train_losses


def test_plan_budgets_rounds_to_steps_and_caps_at_passes():
    bs = plan_budgets(save_at_tokens=[4000], save_at_dn=[2, 0.5], n_params=1000, batch_tokens=1000,
                      stream_tokens=1500, max_passes=2)
    assert [(b.label, b.requested_tokens, b.step, b.tokens, b.capped) for b in bs] == [
        ("dn0.5", 500, 1, 1000, False), ("dn2", 2000, 2, 2000, False), ("t4000", 4000, 3, 3000, True)]
    assert bs[0].dn == 0.5 and bs[2].dn is None
    with pytest.raises(ValueError, match="less than one step"):
        plan_budgets(save_at_tokens=[1], save_at_dn=[], n_params=1, batch_tokens=1000, stream_tokens=100,
                     max_passes=1)
    with pytest.raises(ValueError, match="repeat"):
        plan_budgets(save_at_tokens=[5, 5], save_at_dn=[], n_params=1, batch_tokens=1, stream_tokens=9,
                     max_passes=0)


def test_wsd_schedule_is_constant_after_warmup():
    kw = dict(iterations=10, warmdown_iters=5, max_wallclock_s=0)
    assert [lr_scale(s, 0.0, schedule="wsd", warmup_steps=4, **kw) for s in (0, 1, 3, 4, 9)] == \
        [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_scale(9, 0.0, **kw) == pytest.approx(0.2)  # the warmdown schedule decays at the end


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_budget_checkpoints_cap_and_branch_equals_continuing(tmp_path):
    common = ("--ema-decay", "0.9", "--checkpoint-every", "1000", "--optim.muon-momentum-warmup-steps", "6",
              "--lr-warmup-steps", "2", "--micro-batch-tokens", "1024", "--val-tokens", "1024")
    # budgets 2 and 4 steps of 1,024 tokens, and D/N = 1 (~25 steps) capped at 0.1 passes over 60,000 tokens (5)
    parent = train(parse_config(_args(tmp_path, *common, "--schedule", "wsd", "--run-name", "wsd",
                                      "--save-at-tokens", "2048,4096", "--save-at-dn", "1", "--max-passes", "0.1")))
    run = tmp_path / "runs" / "wsd"
    plan = parent["budget_plan"]
    by = {b["label"]: b for b in plan["budgets"]}
    assert plan["n_params"] == parent["non_embedding_params"] < parent["num_params"]
    assert plan["cap_step"] == 5 and parent["steps"] == 5 and parent["train_passes"] <= 0.1
    assert [(by[k]["step"], by[k]["capped"], by[k]["saved"]) for k in ("t2048", "t4096", "dn1")] == \
        [(2, False, True), (4, False, True), (5, True, True)]
    assert by["dn1"]["requested_tokens"] == plan["n_params"] > 5 * 1024
    assert sorted(p.name for p in (run / "budgets").iterdir()) == ["dn1_r0.pt", "t2048_r0.pt", "t4096_r0.pt"]
    assert [_state(run / "budgets" / f"{k}_r0.pt")["step"] for k in ("t2048", "t4096", "dn1")] == [2, 4, 5]
    assert json.loads((run / "budgets.json").read_text())["budgets"][0]["label"] == "t2048"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_scale"] for r in rows if r["kind"] == "train"] == [0.5, 1.0, 1.0, 1.0, 1.0]  # warmup, then constant

    # the branch: 2 decay steps (0.5 of 4) from the t4096 checkpoint, as a run of its own
    branch = train(parse_config(["--branch-from", str(run / "budgets" / "t4096_r0.pt"), "--decay-frac", "0.5",
                                 "--run-name", "branch", "--progress", "false"]))
    # the same schedule in one process: constant lr for 4 steps, then the warmdown over 2
    cont = train(parse_config(_args(tmp_path, *common, "--iterations", "6", "--warmdown-iters", "2",
                                    "--run-name", "cont")))
    b_run, c_run = tmp_path / "runs" / "branch", tmp_path / "runs" / "cont"
    assert branch["steps"] == cont["steps"] == 6 and branch["train_tokens"] == 6 * 1024
    assert branch["branch"]["from_step"] == 4 and branch["branch"]["decay_steps"] == 2
    assert branch["branch"]["budget"]["label"] == "t4096" and branch["branch"]["budget"]["capped"] is False
    cfg = json.loads((b_run / "config.json").read_text())
    assert cfg["branch_from"].endswith("t4096_r0.pt") and cfg["iterations"] == 6 and cfg["warmdown_iters"] == 2
    losses_c = _train_losses(c_run)
    assert _train_losses(b_run) == {5: losses_c[5], 6: losses_c[6]}
    assert {k: v for k, v in _train_losses(run).items() if k <= 4} == {k: losses_c[k] for k in range(1, 5)}
    end_b, end_c = _state(b_run / "checkpoint_r0.pt"), _state(c_run / "checkpoint_r0.pt")
    for key in ("step", "model", "opts", "ema", "loader"):  # bit for bit
        assert _same(end_b[key], end_c[key]), key
    assert branch["val_bpb"] == cont["val_bpb"] and branch["val_bpb_quant"] == cont["val_bpb_quant"]
    rows = [json.loads(x) for x in (b_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_scale"] for r in rows if r["kind"] == "train"] == [1.0, 0.5]  # linear, 0 after the last step


def test_budget_and_branch_input_errors_exit_2(tmp_path, capsys):
    assert main(_args(tmp_path, "--save-at-dn", "25", "--max-wallclock-s", "5")) == 2
    assert "give --max-wallclock-s 0" in capsys.readouterr().err
    assert main(_args(tmp_path, "--schedule", "cosine")) == 2
    assert "choose from ('warmdown', 'wsd')" in capsys.readouterr().err
    assert main(["--branch-from", str(tmp_path / "runs" / "x" / "budgets" / "dn25_r0.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--branch-from", str(tmp_path / "model.pt")]) == 2
    assert "expected a checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
