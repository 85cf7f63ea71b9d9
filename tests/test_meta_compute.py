"""Meta-training at matched compute (issue 31): counted training FLOPs, a no-meta branch matched to a meta branch's
FLOPs, branch seeds, the meta-objective's per-step curve and MetaSGD's learned rates in the run's files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from metattt.train.cli import main, parse_config
from metattt.train.loop import train

from test_train import _args


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meta_compute")
    train(parse_config(_args(tmp, "--schedule", "wsd", "--loader-mode", "random", "--run-name", "wsd",
                             "--save-at-tokens", "8192", "--final-eval", "off")))
    return tmp, tmp / "runs" / "wsd" / "budgets" / "t8192_r0.pt"


def _branch(tmp: Path, ck: Path, name: str, *extra: str) -> dict:
    return train(parse_config(["--branch-from", str(ck), "--decay-frac", "0.5", "--run-name", name,
                               "--run-root", str(tmp / "runs"), "--final-eval", "off", *extra]))


def test_no_meta_branch_matched_to_a_fomaml_branch_spends_its_flops_within_one_step(parent):
    tmp, ck = parent
    meta = _branch(tmp, ck, "fomaml", "--meta.adapter", "fomaml:lr=0.002", "--meta.every", "2")
    f = meta["flops"]
    plain_step = f["per_plain_step"]
    # 8 steps of 1,024 tokens in the parent, 4 decay steps; meta steps at even steps 8 and 10; a step is two
    # micro-batches of 512 tokens and the meta step replaces the first: inner fwd+bwd + outer fwd+bwd = 2 micro-
    # batches' work, so each meta step costs 1.5 plain steps (counted, not assumed: the model's forward hook)
    assert meta["branch"]["decay_steps"] == 4 and f["steps"] == 4 and f["meta_steps"] == 2
    assert f["run"] == pytest.approx(5.0 * plain_step, rel=1e-12)
    assert f["meta"] == pytest.approx(2 * plain_step, rel=1e-12) and f["total_since_init"] > f["run"]
    matched = _branch(tmp, ck, "matched", "--match-flops-of", str(tmp / "runs" / "fomaml"))
    g = matched["flops"]
    assert g["meta"] == 0 and g["meta_steps"] == 0 and matched["branch"]["decay_steps"] == 5
    assert abs(g["run"] - f["run"]) <= plain_step  # within one step (here: exactly 5 plain steps)
    assert matched["branch"]["flops_budget"] == f["run"]
    # per meta step: the meta-objective after (L_post) and before (L_pre, free on a same-batch split) adaptation
    recs = [r for r in _rows(tmp / "runs" / "fomaml") if r["kind"] == "meta"]
    assert [r["step"] for r in recs] == [9, 11]
    assert all(r["meta/L_pre"] - r["meta/L_post"] == pytest.approx(r["meta/gain"]) for r in recs)


def test_branch_seeds_reseed_the_decay_data_and_metasgd_reports_its_rates(parent):
    tmp, ck = parent
    a = _branch(tmp, ck, "seed1", "--branch-seed", "1")
    b = _branch(tmp, ck, "seed2", "--branch-seed", "2")
    a2 = _branch(tmp, ck, "seed1-again", "--branch-seed", "1")
    assert a["val_bpb"] != b["val_bpb"] and a["val_bpb"] == a2["val_bpb"]
    assert a["branch"]["branch_seed"] == 1 and a["flops"]["meta"] == 0
    m = _branch(tmp, ck, "metasgd", "--meta.adapter", "metasgd:lr_init=0.003", "--meta.every", "1",
                "--meta.split", "cross-doc", "--meta.log-pre", "true", "--branch-seed", "1")
    rates = m["meta_params"]
    assert rates and all(r["kind"] == "rate" and r["init"] == 0.003 for r in rates.values())
    moved = [v for r in rates.values() for v in r["values"]]
    assert any(abs(v - 0.003) > 1e-7 for v in moved)  # the outer loop trained them
    recs = [r for r in _rows(tmp / "runs" / "metasgd") if r["kind"] == "meta"]
    assert len(recs) == m["flops"]["meta_steps"] == 4 and all("meta/L_pre" in r for r in recs)


def test_compute_matching_input_errors_exit_2(parent, capsys):
    tmp, ck = parent
    base = ["--branch-from", str(ck), "--run-root", str(tmp / "runs"), "--final-eval", "off"]
    assert main([*base, "--match-flops-of", str(tmp / "nowhere"), "--run-name", "x1"]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert main([*base, "--match-flops-of", str(tmp / "runs" / "wsd"), "--run-name", "x2",
                 "--meta.adapter", "fomaml"]) == 2
    assert "not with --meta.adapter" in capsys.readouterr().err
    assert main(_args(tmp, "--branch-seed", "3", "--run-name", "x3")) == 2
    assert "give --branch-from" in capsys.readouterr().err
    assert not any((tmp / "runs" / n).exists() for n in ("x1", "x2", "x3"))
