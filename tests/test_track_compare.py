"""`python -m metattt compare` on run directories built here with specified numbers.

Expected statistics are recomputed independently: textbook t quantiles (t_{0.975,1}, t_{0.975,2}) and
closed-form two-sided p-values of Student t with 1 and 2 degrees of freedom.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from metattt.__main__ import main as metattt_main
from metattt.track.compare import CompareError, compare_runs, load_runs
from metattt.track.compare_cli import main as compare_main

REPO = Path(__file__).resolve().parents[1]
T975 = {1: 12.706204736174698, 2: 4.302652729749464}  # t_{0.975,df} (tables give 12.706, 4.303)

# adapter -> {seed: ttt_delta}
DELTAS = {
    "none": {0: 0.0010, 1: -0.0005, 2: 0.0002},
    "sgd": {0: -0.0120, 1: -0.0150, 2: -0.0100},
    "lora": {0: -0.0200, 1: -0.0260},
    "metasgd": {0: -0.0300},
}


def _p_two_sided(t: float, df: int) -> float:
    a = abs(t)
    if df == 1:
        return 1 - 2 / math.pi * math.atan(a)
    if df == 2:
        return 1 - a / math.sqrt(2 + a * a)
    raise AssertionError(df)


def _mean_half(xs: list[float]) -> tuple[float, float | None]:
    n = len(xs)
    m = sum(xs) / n
    if n == 1:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975[n - 1] * sd / math.sqrt(n)


def _write_run(root: Path, adapter: str, seed: int, delta: float) -> Path:
    """A run directory as the trainer + evaluator write it (eval.json in the evaluator's schema)."""
    d = root / f"{adapter}-s{seed}"
    d.mkdir(parents=True)
    cfg = {"seed": seed, "meta": {"adapter": adapter, "inner_lr": 0.01}, "iterations": 30, "run_name": d.name}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text(json.dumps({"val_bpb": 1.30 + 0.01 * seed + delta, "val_bpb_quant": 1.31}))
    proto = f"ttt:{adapter}"
    curve = [None] + [delta * (i + 1) / 4 for i in range(4)]  # None: no bytes scored yet in chunk 0
    (d / "eval.json").write_text(json.dumps({
        "schema": "metattt.eval/1",
        "config": {"seed": 0},  # the bootstrap seed: must not be taken as the pairing seed
        "protocols": {"sliding": {"bpb": 1.3}, proto: {"bpb": 1.3 - delta}},
        "deltas": {proto: {"from": "sliding", "to": proto, "value": delta, "ci95": [delta - 1e-3, delta + 1e-3]}},
        "running_delta": {proto: {"from": "sliding", "to": proto, "block_tokens": 1024, "chunk": list(range(5)),
                                  "delta_bpb": curve}},
    }))
    lines = []
    for step in range(0, 31, 10):
        lines.append({"step": step, "time_s": step * 0.1, "kind": "train", "train_loss": 4.0 - step / 20})
        lines.append({"step": step, "time_s": step * 0.1, "kind": "val", "val_bpb": 2.0 - step / 40 + delta})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for adapter, by_seed in DELTAS.items():
        for seed, delta in by_seed.items():
            _write_run(root, adapter, seed, delta)
    bad = root / "broken-run"
    bad.mkdir()
    (bad / "config.json").write_text('{"seed": 0, "meta": {"adapter": "sgd"')  # truncated JSON
    nometric = root / "no-eval"
    nometric.mkdir()
    (nometric / "config.json").write_text(json.dumps({"seed": 1, "meta": {"adapter": "sgd"}}))
    return root


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    return {r["group"]: r for r in csv.DictReader(io.StringIO(path.read_text()))}


def test_table_numbers_match_independent_formulas(runs_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    rc = compare_main([str(runs_root), "--by", "adapter", "--metric", "ttt_delta", "--baseline", "none",
                       "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    rows = _csv_rows(out / "compare.csv")
    assert set(rows) == {f"adapter={a}" for a in DELTAS}
    base = DELTAS["none"]
    for adapter, by_seed in DELTAS.items():
        row = rows[f"adapter={adapter}"]
        vals = [by_seed[s] for s in sorted(by_seed)]
        m, half = _mean_half(vals)
        assert int(row["n"]) == len(vals)
        assert float(row["mean"]) == pytest.approx(m, abs=1e-15)
        if half is None:
            assert row["ci_half"] == ""
        else:
            assert float(row["ci_half"]) == pytest.approx(half, rel=1e-9)
        if adapter == "none":
            assert row["is_baseline"] == "1" and row["delta"] == ""
            continue
        diffs = [by_seed[s] - base[s] for s in sorted(by_seed)]
        dm, dhalf = _mean_half(diffs)
        assert float(row["delta"]) == pytest.approx(dm, abs=1e-15)
        assert int(row["n_pairs"]) == len(diffs)
        if len(diffs) == 1:
            assert row["p_value"] == "" and row["delta_ci_half"] == ""
        else:
            sd = math.sqrt(sum((d - dm) ** 2 for d in diffs) / (len(diffs) - 1))
            t = dm / (sd / math.sqrt(len(diffs)))
            assert float(row["t"]) == pytest.approx(t, rel=1e-9)
            assert float(row["p_value"]) == pytest.approx(_p_two_sided(t, len(diffs) - 1), rel=1e-7)
            assert float(row["delta_ci_half"]) == pytest.approx(dhalf, rel=1e-9)

    # Spot-check by hand: sgd vs none, diffs -0.013, -0.0145, -0.0102 → t ≈ -9.973 with df 2, just beyond
    # the table's t_{0.995,2} = 9.925, so p is just under 0.01.
    assert float(rows["adapter=sgd"]["t"]) == pytest.approx(-9.973, abs=1e-3)
    assert 0.0098 < float(rows["adapter=sgd"]["p_value"]) < 0.0100

    md = (out / "compare.md").read_text()
    assert md == captured.out
    m_sgd, h_sgd = _mean_half(list(DELTAS["sgd"].values()))
    assert f"| adapter=sgd | 3 | 0,1,2 | {m_sgd:.4f} ± {h_sgd:.4f} |" in md
    assert "| adapter=none (baseline) | 3 |" in md
    assert "-0.0300 (n=1)" in md
    # Malformed and metric-less runs: named on stderr and in the footer, never averaged in.
    assert "broken-run" in captured.err and "config.json is not valid JSON" in captured.err
    assert "no-eval" in captured.err
    footer = md.split("Skipped runs (2):")[1]
    assert "`" + str(runs_root / "broken-run") + "`" in footer and "`no-eval`: metric 'ttt_delta' not found" in footer
    assert "broken-run" not in rows["adapter=sgd"]["runs"] and "no-eval" not in rows["adapter=sgd"]["runs"]

    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert {r["source"] for r in runs if r["run"] == "sgd-s1"} == {"eval.json:deltas.ttt:sgd"}
    js = json.loads((out / "compare.json").read_text())
    assert js["baseline"] == "adapter=none" and len(js["skipped"]) == 2

    for name in ("learning_curves.png", "ttt_delta_curves.png", "metric_bars.png"):
        png = out / name
        assert png.stat().st_size > 5000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grouping_lookup_variants(runs_root: Path) -> None:
    runs, skipped = load_runs(sorted(p for p in runs_root.iterdir()))
    assert [s.name for s in skipped] == [str(runs_root / "broken-run")]
    exact = compare_runs(runs, by=["meta.adapter"], metric="protocols.sliding.bpb", baseline="meta.adapter=none")
    suffix = compare_runs(runs, by=["adapter"], metric="bpb:sliding", baseline="none")
    assert [g.ci.mean for g in exact.groups] == [g.ci.mean for g in suffix.groups]
    assert exact.groups[0].ci.mean == pytest.approx(1.3)
    per_adapter = compare_runs(runs, by=["adapter"], metric="ttt_delta:lora")
    assert [g.label for g in per_adapter.groups] == ["adapter=lora"]  # other runs lack that protocol: skipped
    assert len(per_adapter.skipped) == len(runs) - 2
    # Auto grouping ignores seed / run_name and finds the adapter.
    auto = compare_runs(runs, metric="ttt_delta")
    assert auto.by == ["meta.adapter"]
    # Summary metric: "bpb" → val_bpb_quant; "val_bpb" exact from summary.json, not from metrics.jsonl.
    assert compare_runs(runs, by=["adapter"], metric="bpb").groups[0].runs[0].source == "summary.json:val_bpb_quant"
    alias = compare_runs(runs, by=["adapter"], metric="val_bpb", baseline="none")
    assert alias.groups[0].runs[0].source == "summary.json:val_bpb"
    # Paired by the top-level seed: the seed offset 0.01*seed cancels, leaving the ttt deltas' differences.
    lora = next(g for g in alias.groups if g.label == "adapter=lora")
    assert lora.paired is not None
    assert lora.paired.mean_diff == pytest.approx(((-0.0200 - 0.0010) + (-0.0260 + 0.0005)) / 2, abs=1e-12)
    with pytest.raises(CompareError, match="matches no group"):
        compare_runs(runs, by=["adapter"], baseline="nonexistent")
    # Several TTT protocols in one eval.json: "ttt_delta" asks which one.
    two = runs[0]
    two.eval["deltas"]["ttt:other"] = {"value": 0.5}
    with pytest.raises(CompareError, match="several TTT deltas.*ttt_delta:other"):
        compare_runs([two], metric="ttt_delta")
    # A NaN metric (diverged run) is skipped, not averaged.
    two.eval["deltas"]["ttt:other"] = {"value": float("nan")}
    nan = compare_runs([two], metric="ttt_delta:other")
    assert not nan.groups and "is nan" in nan.skipped[0].reason


def test_ambiguous_field_and_duplicate_seeds(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for i, adapter in enumerate(["a", "a"]):
        d = root / f"x{i}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"seed": 0, "ttt": {"lr": 0.1}, "optim": {"lr": 0.2}, "adapter": adapter}))
        (d / "eval.json").write_text(json.dumps({"ttt_delta": -0.01 * (i + 1)}))
    runs, _ = load_runs([root])
    with pytest.raises(CompareError, match="ambiguous.*optim.lr"):
        compare_runs(runs, by=["lr"])
    cmp = compare_runs(runs, by=["adapter"])
    assert any("occur more than once" in w for w in cmp.warnings)
    assert cmp.groups[0].ci.n == 2


def test_cli_dispatch_subprocess(runs_root: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "metattt", "compare", str(runs_root / "sgd-s0"), str(runs_root / "none-s0"),
         "--by", "adapter", "--baseline", "none", "--no-plots"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "| adapter=sgd | 1 | 0 | -0.0120 (n=1) | -0.0130 (n=1) | 1 | — |" in res.stdout


def test_main_usage_and_errors(runs_root: Path, capsys) -> None:
    assert metattt_main([]) == 2
    assert "compare" in capsys.readouterr().out
    assert metattt_main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err
    assert compare_main([str(runs_root / "broken-run")]) == 1
    err = capsys.readouterr().err
    assert "broken-run" in err and "no run had a usable" in err
