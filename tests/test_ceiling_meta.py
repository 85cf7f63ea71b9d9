"""The meta-training study at matched compute (issue 31): experiments/ceiling_meta_cpu.toml end to end on generated
text (base, decay branches per arm and seed, the FLOPs-matched no-meta arm, both validation sets), and the
generated arms section held to the run directories."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpu_study import run_cpu_study

pytestmark = pytest.mark.slow  # 13 short trainings and 12 evaluations (as tests/test_ceiling_ladder.py)


@pytest.fixture(scope="module")
def meta_study(tmp_path_factory):
    """experiments/ceiling_meta_cpu.toml run once on a build of generated text, as its header says; regenerated
    from the run dirs alone the report stays the same."""
    root = tmp_path_factory.mktemp("meta")
    cfg, report = run_cpu_study(root, "ceiling_meta_cpu.toml", ["--report-only"])
    return root, report, cfg


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cpu_meta_arms_section_is_the_run_directories(meta_study):
    from report_tables import parse_arm_rows
    from metattt.study.config import load_study

    root, report, cfg = meta_study
    study = load_study(cfg)
    arms = study.arms
    models = {m.name: study.model_dir(m) for m in study.models}
    summ = {n: _json(d / "summary.json") for n, d in models.items() if n != "base.wsd"}
    # compute matching: each no-meta branch spends its FOMAML twin's counted FLOPs within one plain step
    for s in (1, 2):
        a, b = summ[f"nometa.s{s}"]["flops"], summ[f"fomaml-sb.s{s}"]["flops"]
        assert a["meta"] == 0 and b["meta_steps"] > 0 and abs(a["run"] - b["run"]) <= a["per_plain_step"]
        assert summ[f"nometa.s{s}"]["branch"]["decay_steps"] > summ[f"fomaml-sb.s{s}"]["branch"]["decay_steps"]
    rows = parse_arm_rows(report)
    assert arms.valsets == ("indist",)
    for v in arms.valsets:
        for arm in arms.arms:
            own, ref_p = arms.own[arm]

            def mean_bpb(a: str, proto: str) -> float:  # the order-averaged bpb of each seed, then over seeds
                out = []
                for s in arms.seeds[a]:
                    (cell,) = (study.root / "cells" / f"{a}.s{s}").glob(f"{v}-{a}-*")
                    ev = _json(cell / "eval.json")
                    out.append(ev["runs"]["protocols"][proto]["bpb_mean"])
                    assert ev["runs"]["n_runs"] == 2
                return float(np.mean(out))

            prim = rows[(v, arm, f"**final legal TTT bpb**: `{own}` vs `{ref_p}`")]
            want = mean_bpb(arm, own) - mean_bpb("nometa", ref_p)
            assert prim["arm − reference"] == f"{want:+.5f}"
            lo, hi = (float(x) for x in prim["95% CI"].strip("[]").split(","))
            assert lo <= float(prim["arm − reference"]) <= hi
            word = prim["verdict"]
            assert word in ("better", "worse", "equivalent") or word.startswith("unresolved (")
            sgd = rows[(v, arm, "bpb `ttt:sgd`")]
            assert sgd["arm − reference"] == f"{mean_bpb(arm, 'ttt:sgd') - mean_bpb('nometa', 'ttt:sgd'):+.5f}"
            ctx = rows[(v, arm, "Δ_context: flat → sliding")]
            want = ((mean_bpb(arm, "flat") - mean_bpb(arm, "sliding"))
                    - (mean_bpb("nometa", "flat") - mean_bpb("nometa", "sliding")))
            assert ctx["arm − reference"] == f"{want:+.5f}"
    # the meta-objective's curve: one record per meta step of every meta arm, in the table and the plot
    for arm in arms.arms:
        recs = [json.loads(x) for x in (models[f"{arm}.s1"] / "metrics.jsonl").read_text().splitlines()]
        meta = [r for r in recs if r["kind"] == "meta"]
        assert len(meta) == summ[f"{arm}.s1"]["flops"]["meta_steps"] > 0
        assert all("meta/L_post" in r and "meta/L_pre" in r for r in meta)
        assert f"| {arm} | 2 | {len(meta)} | " in report
    assert (root / "plots" / f"{study.name}-M0-meta-objective.png").stat().st_size > 1000
    rates = summ["metasgd.s1"]["meta_params"]
    assert rates and "| metasgd | `" in report and all(r["init"] == 0.002 for r in rates.values())
    assert "docttt:doclora@init=meta" in report
    assert "Ladder points" not in report  # the arms section, not the ladder's tables
