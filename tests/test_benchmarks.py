"""The throughput benchmarks parse their variant tokens and run end to end (CPU, tiny models); the docttt
projection's arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as tt  # noqa: E402


def test_variant_tokens():
    v = tt.parse_variant("compile+bf16+unfused-qkv+unfolded+no-qkv-kernel+mb=196608+attn=sdpa-cudnn+ind:max_autotune=1")
    assert v["compile"] and v["bf16"] and not v["fused_qkv"] and not v["fold_gains"] and not v["qkv_kernel"] and v["mb"] == 196608 and v["attn"] == "sdpa-cudnn"
    assert v["inductor"] == {"max_autotune": True}  # parsed to the option's own type
    plain = tt.parse_variant("eager")
    assert not plain["compile"] and not plain["bf16"] and plain["fused_qkv"] and plain["fold_gains"] and plain["inductor"] == {}
    with pytest.raises(SystemExit, match="unknown variant token"):
        tt.parse_variant("compile+fast")
    with pytest.raises(SystemExit, match="unknown variant token 'mlp-kernel'"):  # removed with its kernel
        tt.parse_variant("compile+mlp-kernel")
    with pytest.raises(SystemExit, match="unknown Inductor option"):
        tt.parse_variant("compile+ind:no_such_option=1")


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--preset", "tiny-synthetic",
                          "--variants", "eager,eager+bf16+unfused-qkv", "--steps", "1", "--warmup", "0",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["eager", "eager+bf16+unfused-qkv"]
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["accum"] >= 1 for r in rows)


def test_attention_benchmark_imports_and_parses_args():
    """It carries its own CUDA-event timer (the MLP-kernel benchmark it borrowed it from was removed)."""
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--backends" in res.stdout


import eval_throughput as et  # noqa: E402


def test_docttt_projection_arithmetic():
    """The docttt time model: per chunk fwd(t_c, rows_c) (+ upd except on a batch's last chunk), batches sorted
    longest first, dealt over ranks by docttt's schedule, the slowest rank's sum (hand-computed cases); it lives in
    metattt.eval.docttt_model, shared by the benchmark and the evaluator's projection."""
    from metattt.eval import docttt_model as dm

    sm = dm.StepModel(t=np.array([16.0, 24.0]), fwd1=np.ones(2), fwd_full=np.full(2, 2.0), upd1=np.full(2, 10.0),
                      upd_full=np.full(2, 20.0), rows=2, overhead=0.5)  # fwd = rows, upd = 10 x rows
    lengths = np.array([10, 70, 37])  # batches of 2: [70, 37] (5 and 3 chunks of 16), [10]
    one = dm.project_docttt(lengths, sm, 16, 24, 2, 1, shapes="exact")
    assert one["batches"] == 2 and one["docs"] == 3 and one["targets"] == 117
    assert one["wall_s"] == pytest.approx((2 + 2 + 2 + 1 + 1) + 10 * (2 + 2 + 2 + 1) + 0.5 + 1 + 0.5)
    two = dm.project_docttt(lengths, sm, 16, 24, 2, 2, shapes="exact")
    assert two["rank_s"].tolist() == pytest.approx([78.5, 1.5]) and two["wall_s"] == pytest.approx(78.5)
    assert dm.project_docttt(lengths, sm, 16, 24, 2, 1, shapes="batch")["wall_s"] == pytest.approx(
        10 + 80 + 0.5 + 1.5)  # every forward has both rows
    # chunk shapes: at least docttt_batch.MIN_ROWS = 2 rows, so here as batch shapes (the 1-document batch stays 1 row)
    assert dm.project_docttt(lengths, sm, 16, 24, 2, 1)["wall_s"] == pytest.approx(10 + 80 + 0.5 + 1.5)
    assert dm.project_docttt(lengths, sm, 16, 24, 2, 1, shapes="exact", train=False)["wall_s"] == pytest.approx(
        8.5 + 1.5)
    lin = dm.StepModel(t=np.array([16.0, 32.0]), fwd1=np.array([1.0, 3.0]), fwd_full=np.array([5.0, 7.0]),
                       upd1=np.zeros(2), upd_full=np.zeros(2), rows=3)
    assert lin.fwd(np.array([24.0]), np.array([1]))[0] == pytest.approx(2.0)
    assert lin.fwd(np.array([24.0]), np.array([2]))[0] == pytest.approx(4.0)  # halfway between 1 and 3 rows
    lin2 = replace(lin, rows_lo=2)  # the low column measured at 2 rows
    assert lin2.fwd(np.array([24.0, 24.0]), np.array([2, 3])).tolist() == pytest.approx([2.0, 6.0])
    got = dm.resample_lengths(np.array([3, 5, 100]), 10_000, seed=1)
    assert got.sum() >= 10_000 and got[:-1].sum() < 10_000 and set(got.tolist()) <= {3, 5, 100}
    assert np.array_equal(got, dm.resample_lengths(np.array([3, 5, 100]), 10_000, seed=1))


def test_eval_benchmark_docttt_runs_on_cpu(tmp_path):
    """One command: the measured run, the step calibration and the projection, for doc-chunk and docttt."""
    from metattt.artifact.model_io import save_model_artifact
    from metattt.model.gpt import BankedGPT

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_config

    torch.manual_seed(0)
    art = tmp_path / "tiny.ptz"
    save_model_artifact(art, BankedGPT(tiny_config()), allow_over_budget=True)
    opts = "chunk=16/docs=4/window=48"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_throughput.py"), str(art), "--tokens", "2500",
                          "--context", "48", "--chunk-tokens", "256", "--protocols",
                          f"doc-chunk@{opts},docttt:doclora@{opts}/rank=4", "--variants", "eager,eager+shapes=batch",
                          "--profile", "3"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    head, _, tail = out.partition("\nvariant ")  # calibrations print before each run, the checks after the table
    assert head.count("PROJECTED") == 4 and "measured / modelled" not in head, out
    assert tail.count("PROJECTED") == 4 and tail.count("measured / modelled") == 4, out
    assert "shapes exact" in out and "shapes batch" in out
    assert out.count("\nprofile, ") == 4 and "aten calls" in out and "busy" in out  # one profile per calibration
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_throughput.py"), "--variants", "eager+fast"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown variant token" in bad.stderr


def _fake_run(d: Path, losses: dict[int, float], end: float) -> None:
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "train_loss": v}) + "\n"
                                                   for s, v in losses.items()))
    d.joinpath("summary.json").write_text(json.dumps({"val_bpb_quant": end}))


def test_lever_quality_compares_levers_with_the_seed_spread(tmp_path):
    import lever_quality as lq

    steps = range(25, 501, 25)
    _fake_run(tmp_path / "lq-base-s1", {s: 3.0 for s in steps}, 1.500)
    _fake_run(tmp_path / "lq-base-s2", {s: 3.02 for s in steps}, 1.504)  # spread: 0.02 nats, 0.004 bpb
    _fake_run(tmp_path / "lq-good-s1", {s: 3.01 for s in steps}, 1.502)
    _fake_run(tmp_path / "lq-good-s2", {s: 3.01 for s in steps}, 1.505)
    # off only in the first half (ignored by the curve gap), then 0.05 nats and 0.010 bpb worse
    _fake_run(tmp_path / "lq-bad-s1", {s: (9.0 if s <= 250 else 3.05) for s in steps}, 1.510)
    _fake_run(tmp_path / "lq-bad-s2", {s: 3.07 for s in steps}, 1.514)
    res = lq.compare(tmp_path, [lq.Arm("good", ()), lq.Arm("bad", ())], (1, 2))
    assert res["seed_spread"]["curve"] == pytest.approx(0.02) and res["seed_spread"]["end"] == pytest.approx(0.004)
    good, bad = res["levers"]["good"], res["levers"]["bad"]
    assert good["curve"] == pytest.approx(0.01) and good["end"] == pytest.approx(0.0015) and good["within"]
    assert bad["curve"] == pytest.approx(0.05) and bad["end"] == pytest.approx(0.010) and not bad["within"]
    assert "OUTSIDE" in lq.show(res) and "within one seed's spread" in lq.show(res)
    # bad input: a clear error, exit 2, nothing trained or written
    assert lq.main(["--compare-only", "--lever", "good=", "--lever", "missing=", "--runs", str(tmp_path)]) == 2
    assert lq.main(["--lever", "base=--x", "--runs", str(tmp_path)]) == 2
    assert lq.main(["--lever", "good=", "--seeds", "1,1", "--runs", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="NAME=FLAGS"):
        lq.parse_lever("no-equals-sign")


def test_lever_quality_trains_its_arms_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lever_quality.py"), "--lever",
                          "bf16=--runtime.residual-dtype bfloat16", "--steps", "3", "--runs", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "lq.json"), "--", "--preset", "tiny-synthetic"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "lq.json").read_text())
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lq-base-s1", "lq-base-s2", "lq-bf16-s1",
                                                                     "lq-bf16-s2"]
    assert out["seed_spread"]["curve"] > 0  # two seeds train differently
    assert set(out["levers"]) == {"bf16"}
    # run again after a cut: finished arms are kept, an unfinished one is moved aside and trained again
    runs = tmp_path / "runs"
    (runs / "lq-bf16-s2" / "summary.json").unlink()
    kept = (runs / "lq-base-s1" / "summary.json").read_text()
    again = subprocess.run(res.args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "lq-base-s1: finished before, kept" in again.stdout
    assert (runs / "lq-base-s1" / "summary.json").read_text() == kept
    assert (runs / "lq-bf16-s2.interrupted1" / "metrics.jsonl").is_file()
    assert (runs / "lq-bf16-s2" / "summary.json").is_file()


def test_compat_residual_runs_baselines_first_then_single_switches():
    import compat_residual as cr
    from metattt.eval.compat import parse_knobs

    todo = cr.jobs(["a", "b"], "b")
    assert [j[:2] for j in todo[:2]] == [("a", ""), ("b", "")]
    assert [j[1] for j in todo[2:]] == list(cr.TTT_KNOBS + cr.SCORE_KNOBS)
    assert cr.jobs(["a"], "b") == [("a", "", cr.ALL)]  # variants only on a model that is run
    for k in cr.TTT_KNOBS + cr.SCORE_KNOBS:  # every variant is one valid switch away from the default
        assert parse_knobs(k) != parse_knobs("")
