"""The ladder study (issue 29): fits of Δ against D/N, and the CPU-sized variant of experiments/ceiling_ladder.toml
end to end (data split, budget run, decay branches, both validation sets, report tables held to the run dirs)."""
from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from metattt.study.ladder import PREDICT_DN, fit_size, ladder_points, ladder_tables, power_floor

REPO = Path(__file__).resolve().parents[1]


def _fake_cell(model: str, setting: str, n: int, dn: float, gains: dict[str, np.ndarray], nbytes: np.ndarray):
    """A done ladder cell as report.collect gives it: eval.json with per-document nats, the branch's summary."""
    base = np.full(nbytes.size, 1000.0)
    nats = {"flat": base, "sliding": base - gains["context"], "ttt:sgd": base - gains["context"] - gains["ttt:sgd"]}
    ev = {"deltas": {"context": {"from": "flat", "to": "sliding"}, "ttt:sgd": {"from": "sliding", "to": "ttt:sgd"}},
          "per_document": {"bytes": nbytes.tolist(), "nats": {k: v.tolist() for k, v in nats.items()}},
          "bootstrap": {"n": 200, "seed": 0, "level": 0.95},
          "protocols": {k: {"bpb": float(v.sum() / math.log(2) / nbytes.sum())} for k, v in nats.items()}}
    for d in ev["deltas"].values():
        g = nats[d["from"]] - nats[d["to"]]
        d["value"] = float(g.sum() / math.log(2) / nbytes.sum())
        d["ci95"] = [d["value"] - 0.001, d["value"] + 0.001]
    tokens = int(dn * n)
    summary = {"train_tokens": int(tokens * 1.15),
               "branch": {"budget": {"dn": dn, "n_params": n, "tokens": tokens, "capped": dn > 150}}}
    return SimpleNamespace(cell=SimpleNamespace(model=SimpleNamespace(name=model), ev=SimpleNamespace(name=setting)),
                           eval=ev, model_summary=summary)


def test_power_floor_fit_recovers_the_curve_with_a_joint_document_bootstrap():
    rng = np.random.default_rng(0)
    nbytes = rng.uniform(2000, 6000, size=120)
    truth = {"A": 0.08, "gamma": 0.6, "F": 0.004}
    doc_effect = rng.normal(0, 1, size=nbytes.size)  # shared by every budget: the same documents
    cells = []
    for dn in (25, 50, 100, 200):
        x = dn * 1.15
        want = {"context": 0.02 + 0.0 * x, "ttt:sgd": float(power_floor(np.array([x]), *truth.values())[0])}
        gains = {k: v * math.log(2) * nbytes + 0.3 * doc_effect * nbytes / 1000 + rng.normal(0, 0.05, nbytes.size)
                 for k, v in want.items()}
        cells.append(_fake_cell(f"m.dn{dn}", "indist", 1_000_000, dn, gains, nbytes))
    cells.append(_fake_cell("other.dn25", "indist", 2_000_000, 25, gains, nbytes))  # another size: one point
    points = ladder_points(cells)
    assert [p.model for p in points] == ["m.dn25", "m.dn50", "m.dn100", "m.dn200", "other.dn25"]
    assert points[0].dn_trained == pytest.approx(25 * 1.15) and points[3].capped and not points[0].capped
    fit = fit_size([p for p in points if p.n_params == 1_000_000], "ttt:sgd", n_boot=200)
    assert fit is not None and fit.n_points == 4 and fit.n_failed < 20
    for k, v in truth.items():
        assert fit.ci[k][0] <= v <= fit.ci[k][1], (k, fit.params, fit.ci)
        assert fit.params[k] == pytest.approx(v, rel=0.25, abs=0.002)
    pred = float(power_floor(np.array([PREDICT_DN]), *truth.values())[0])
    assert fit.ci["pred"][0] <= pred <= fit.ci["pred"][1]
    assert fit_size([points[-1]], "ttt:sgd") is None  # fewer than 3 budgets: no fit
    lines = ladder_tables(cells)
    text = "\n".join(lines)
    assert "| m.dn200 | indist | 1,000,000 | 200 | 230.0 | yes |" in text
    row = next(line for line in lines if line.startswith("| indist | 1,000,000 | ttt:sgd | 4 |"))
    assert f"{fit.params['F']:+.5f}" in row and "of 200 |" in row
    assert not any(line.startswith("| indist | 2,000,000 |") for line in lines)  # no fit for the one-point size
