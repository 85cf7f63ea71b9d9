"""The arms report of a meta-training study (issue 31): seeds → documents intervals, TOST + Holm, one verdict per
arm (constructed eval.json inputs), and the config's [arms] checks."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

from metattt.study.arms import ArmCell, ArmsConfig, compare, comparisons, seeds_to_resolve, verdict

LN2 = math.log(2.0)
D, S = 120, 5


def _cell(arm: str, seed: int, bpb: dict[str, np.ndarray], nbytes: np.ndarray) -> ArmCell:
    """A done cell whose per-document nats give these per-document bpb (mean over orders stored as the evaluator
    stores it)."""
    nats = {k: (v * LN2 * nbytes).tolist() for k, v in bpb.items()}
    ev = {"per_document": {"bytes": nbytes.tolist(), "nats": nats}, "runs": {"n_runs": 3, "doc_nats_mean": nats}}
    return ArmCell(arm, seed, "indist", SimpleNamespace(eval=ev))


CFG = ArmsConfig(section="2", reference="nometa", margin_bpb=0.001, alpha=0.05, valsets=("indist",),
                 own={"nometa": ("ttt:sgd", "ttt:sgd"), "better": ("ttt:x", "ttt:x"), "worse": ("ttt:x", "ttt:x"),
                      "same": ("ttt:x", "ttt:x"), "noisy": ("ttt:x", "ttt:x")},
                 common=("ttt:sgd",), n_boot=2000, seeds={a: tuple(range(1, S + 1)) for a in
                                                           ("nometa", "better", "worse", "same", "noisy")})


def _study_cells() -> list[ArmCell]:
    rng = np.random.default_rng(3)
    nbytes = rng.uniform(2000, 6000, D)
    doc = rng.normal(1.2, 0.15, D)  # documents differ a lot; every arm and seed scores the same documents
    shift = {"nometa": 0.0, "better": -0.01, "worse": +0.01, "same": 0.0001, "noisy": 0.0008}
    spread = {"nometa": 0.0, "better": 0.0005, "worse": 0.0005, "same": 0.0001, "noisy": 0.003}
    cells = []
    for arm in shift:
        for s in range(1, S + 1):  # seed offsets -2..+2 spreads around the shift: the seeds' mean is the shift
            x = doc + shift[arm] + spread[arm] * (s - 3) + rng.normal(0, 0.0002, D)
            cells.append(_cell(arm, s, {"flat": doc + 0.05, "sliding": doc + 0.02, "ttt:sgd": x, "ttt:x": x},
                               nbytes))
    return cells


def test_verdicts_equivalent_better_worse_unresolved():
    comps = comparisons(CFG, _study_cells(), "indist")
    prim = comps["primary"]
    assert sorted(prim) == ["better", "noisy", "same", "worse"] and set(comps) == {"primary", "ttt:sgd", "ttt",
                                                                                  "context"}
    words = {a: verdict(c, CFG.margin_bpb, CFG.alpha, len(prim)) for a, c in prim.items()}
    assert words["better"] == "better" and words["worse"] == "worse" and words["same"] == "equivalent"
    m = re.fullmatch(r"unresolved \(≈(\d+) seeds would resolve it\)", words["noisy"])
    assert m and int(m.group(1)) > S, words["noisy"]
    for c in prim.values():  # Holm never lowers a p-value; the interval holds the point
        assert c.p_tost_holm >= c.p_tost and c.p_diff_holm >= c.p_diff and c.lo <= c.point <= c.hi
    assert prim["better"].hi < 0 < prim["worse"].lo
    assert -CFG.margin_bpb < prim["same"].lo < prim["same"].hi < CFG.margin_bpb
    # the noisy arm's spread is the seeds', not the documents': more seeds would resolve it
    assert prim["noisy"].var_seed > 10 * prim["noisy"].var_doc
    # Δ_context is the same for every arm by construction: exactly 0, and equivalent
    assert all(abs(c.point) < 1e-12 for c in comps["context"].values())


def test_compare_is_the_seed_mean_of_ratio_of_sums_and_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    nbytes = rng.uniform(1000, 3000, 50)
    base = rng.normal(1.0, 0.1, 50) * LN2 * nbytes
    a = np.stack([base + 0.002 * k * LN2 * nbytes for k in range(4)])  # seeds 0.000, 0.002, 0.004, 0.006 above
    c = compare(a, np.stack([base] * 4), nbytes, margin=0.001, paired=True, n_boot=1000)
    assert c.point == pytest.approx(0.003, abs=1e-12) and c.var_doc < 1e-12  # documents cancel: the same shift
    assert c.lo < 0.003 < c.hi and c.hi - c.lo > 0.002
    n = seeds_to_resolve(c, 0.001, 0.05)
    assert n is not None and n > 4
    # unpaired with unequal seed counts works and is no narrower
    u = compare(a, np.stack([base] * 3), nbytes, margin=0.001, paired=False, n_boot=1000)
    assert u.point == pytest.approx(0.003, abs=1e-12)
    with pytest.raises(ValueError, match="paired seeds"):
        compare(a, np.stack([base] * 3), nbytes, margin=0.001, paired=True)


def test_arms_config_is_checked_against_models_and_settings():
    from metattt.study.config import StudyConfigError, parse_study

    def study(arms: dict, evals=None) -> dict:
        return {"study": {"name": "t", "root": "r", "sections": {"2": "meta"}},
                "model": [{"name": "p", "train": ["--x"]}, {"name": "nometa.s1", "train": ["--y"]},
                          {"name": "fo.s1", "train": ["--z"]}],
                "eval": evals or [{"name": "v-nometa", "section": "2", "models": ["nometa.s1"],
                                   "protocols": ["flat", "sliding", "ttt:sgd", "ttt:fomaml"]},
                                  {"name": "v-fo", "section": "2", "models": ["fo.s1"],
                                   "protocols": ["flat", "sliding", "ttt:sgd", "ttt:fomaml"]}],
                "arms": arms}

    good = {"section": "2", "reference": "nometa", "margin_bpb": 0.001, "valsets": ["v"],
            "own": {"nometa": "ttt:sgd", "fo": "ttt:fomaml"}}
    st = parse_study(study(good))
    assert st.arms.arms == ["fo"] and st.arms.seeds == {"nometa": (1,), "fo": (1,)} and st.arms.margin_bpb == 0.001
    for bad, msg in ((dict(good, margin_bpb=0), "margin_bpb must be a positive number"),
                     (dict(good, own={"nometa": "ttt:sgd", "fo": "ttt:lora"}), r"lacks protocols \['ttt:lora'\]"),
                     (dict(good, own={"nometa": "ttt:sgd", "xx": "ttt:sgd"}), "no model named xx.s<N>"),
                     (dict(good, valsets=["w"]), "needs an \\[\\[eval\\]\\] named w-nometa"),
                     (dict(good, margin=1), "unknown keys")):
        with pytest.raises(StudyConfigError, match=msg):
            parse_study(study(bad))
