"""The ladder study (issue 29): fits of Δ against D/N, and the CPU-sized variant of experiments/ceiling_ladder.toml
end to end (data split, budget run, decay branches, both validation sets, report tables held to the run dirs)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from metattt.study.ladder import (
    PREDICT_DN,
    RECORD_N,
    continued_training,
    curve_drop,
    fit_size,
    ladder_points,
    ladder_tables,
    point_delta,
    position_split,
    power_floor,
    prediction_table,
    size_extrapolation,
)
from metattt.study.plots import ladder_plot

from cpu_study import run_cpu_study



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


def test_power_floor_fit_recovers_the_curve_with_a_joint_document_bootstrap(tmp_path):
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
    assert ladder_plot(cells, tmp_path / "ladder.png").stat().st_size > 1000
    assert ladder_plot(cells[:0], tmp_path / "none.png") is None


def _level_cell(model: str, n: int, dn: float, level: float, gain: float, nbytes: np.ndarray, *, s_tokens: int,
                epochs: int, runs: list[float] | None = None, parent: str | None = None):
    """A ladder cell whose sliding bpb is ``level`` and Δ_TTT ``gain`` on every document (so any document
    resample gives exactly them), with the adapter's ledger and, optionally, 3 runs of Δ_TTT."""
    ln2 = math.log(2)
    flat = (level + 0.01) * ln2 * nbytes
    sliding = level * ln2 * nbytes
    ttt = (level - gain) * ln2 * nbytes
    nats = {"flat": flat, "sliding": sliding, "ttt:sgd": ttt}
    ev = {"deltas": {"context": {"from": "flat", "to": "sliding", "value": 0.01, "ci95": [0.009, 0.011]},
                     "ttt:sgd": {"from": "sliding", "to": "ttt:sgd", "value": gain,
                                 "ci95": [gain - 1e-4, gain + 1e-4]}},
          "per_document": {"bytes": nbytes.tolist(), "nats": {k: v.tolist() for k, v in nats.items()}},
          "bootstrap": {"n": 100, "seed": 0, "level": 0.95},
          "data": {"n_targets": int(nbytes.sum() / 2.4), "n_bytes": float(nbytes.sum())},
          "protocols": {"flat": {"bpb": level + 0.01}, "sliding": {"bpb": level},
                        "ttt:sgd": {"bpb": level - gain, "ledger": {"n_update_positions": s_tokens},
                                    "adapter_params": {"config": {"epochs": epochs}}}}}
    if runs is not None:
        ev["runs"] = {"n_runs": len(runs), "deltas": {"ttt:sgd": {"value": float(np.mean(runs)), "ci95": [0.0, 1.0],
                                                                 "value_per_run": [gain, *runs[1:]]}},
                      "protocols": {"ttt:sgd": {"bpb_mean": level - float(np.mean(runs))}}}
    tokens = int(dn * n)
    summary = {"train_tokens": tokens, "branch": {"budget": {"dn": dn, "n_params": n, "tokens": tokens,
                                                             "capped": False}, "parent_run": parent}}
    return SimpleNamespace(cell=SimpleNamespace(model=SimpleNamespace(name=model), ev=SimpleNamespace(name="indist")),
                           eval=ev, model_summary=summary)


def test_continued_training_account_on_constructed_curves(tmp_path):
    n, s_tok, epochs = 1_000_000, 500_000, 3
    curve = (0.9, 0.5, 1.2)  # sliding bpb = 0.9·(D/N)^(−0.5) + 1.2
    nbytes = np.random.default_rng(1).uniform(1000, 3000, size=50)
    gains = {25: 0.004, 50: 0.002, 100: 0.0012, 200: 0.0009}
    # the parent's training loss (nats per token) on the same kind of curve, over its steps
    parent = tmp_path / "parent"
    parent.mkdir()
    steps = np.arange(50, 3001, 50)
    per_step = 65_536
    (parent / "summary.json").write_text(json.dumps({"train_tokens": int(steps[-1] * per_step),
                                                     "steps": int(steps[-1])}))
    loss = lambda t: 2.0 * (t / 1e6) ** -0.4 + 2.5  # noqa: E731
    (parent / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": int(k),
                                                              "train_loss": float(loss(k * per_step))}) + "\n"
                                                  for k in steps))
    cells = [_level_cell(f"m.dn{dn}", n, dn, float(power_floor(np.array([dn]), *curve)[0]), g, nbytes,
                         s_tokens=s_tok, epochs=epochs, parent=str(parent)) for dn, g in gains.items()]
    accounts = continued_training(ladder_points(cells), n_boot=50)
    assert [a.point.model for a in accounts] == [f"m.dn{dn}" for dn in gains]
    for a, (dn, g) in zip(accounts, gains.items()):
        want = float(power_floor(np.array([dn]), *curve)[0] - power_floor(np.array([dn + s_tok * epochs / n]),
                                                                            *curve)[0])
        once = float(power_floor(np.array([dn]), *curve)[0] - power_floor(np.array([dn + s_tok / n]), *curve)[0])
        assert a.tokens == s_tok and a.epochs == epochs and a.delta == pytest.approx(g)
        assert a.drop == pytest.approx(want, rel=1e-3) and a.drop_unique == pytest.approx(once, rel=1e-3)
        assert a.remaining == pytest.approx(g - want, rel=1e-3, abs=1e-7)
        assert a.drop_ci[0] <= a.drop <= a.drop_ci[1] and a.drop_ci[1] - a.drop_ci[0] < 1e-6  # no noise at all
        # the parent curve: the drop of its loss over κ·S·epochs tokens at the checkpoint, in bits per byte
        t = dn * n
        tpb = cells[0].eval["data"]["n_targets"] / cells[0].eval["data"]["n_bytes"]
        assert a.drop_parent == pytest.approx((loss(t) - loss(t + s_tok * epochs)) * tpb / math.log(2), rel=1e-3)
    # a larger adapter budget is worth more training; fewer than 3 budgets: no account
    more = continued_training(ladder_points(cells), n_boot=10, kappa=2.0)
    assert all(b.drop > a.drop for a, b in zip(accounts, more))
    assert continued_training(ladder_points(cells[:2]), n_boot=10) == []
    assert curve_drop(np.array([1.0, 2.0]), np.array([3.0, 2.0]), 1.5, 0.1) is None
    text = "\n".join(ladder_tables(cells))
    assert "Continued-training account" in text and f"| indist | m.dn200 | 200.0 | {s_tok:,} | 3 |" in text


def test_points_use_the_hierarchical_interval_and_split_by_position():
    nbytes = np.full(20, 1000.0)
    c = _level_cell("m.dn25", 1000, 25, 2.0, 0.003, nbytes, s_tokens=10, epochs=1, runs=[0.003, 0.004, 0.005])
    (p,) = ladder_points([c])
    v, ci, kind = point_delta(p, "ttt:sgd")
    assert v == pytest.approx(0.004) and ci == [0.0, 1.0] and kind == "runs → documents (3 runs)"
    assert point_delta(p, "context")[2] == "documents, one order"
    assert position_split(p, "ttt:sgd") is None  # no per_position recorded
    ln2 = math.log(2)
    p.eval["per_position"] = {
        "doc_position": {"edges": [0, 128, 1024], "bytes": [100.0, 200.0, 300.0],
                         "nats": {"sliding": [10.0, 20.0, 30.0],
                                  "ttt:sgd": [10.0 - 0.1 * ln2, 20.0, 30.0 - 0.5 * ln2]}},
        "stream_decile": {"bytes": [1.0, 1.0, 2.0, 2.0], "nats": {"sliding": [1, 1, 1, 1], "ttt:sgd": [1, 1, 1, 1]}}}
    sp = position_split(p, "ttt:sgd")
    assert sp["early"] == pytest.approx(0.1 / 100) and sp["late"] == pytest.approx(0.5 / 500)
    assert sp["first_half"] == 0.0 and sp["second_half"] == 0.0
    lines = ladder_tables([c])
    row = next(line for line in lines if line.startswith("| m.dn25 |"))
    assert ("| +0.00400 | [0.00000, 1.00000] | context: documents, one order; ttt:sgd: runs → documents (3 runs) |"
            in row)


def test_prediction_says_one_size_and_extrapolates_three():
    from metattt.study.ladder import PowerFit

    def fit(n, pred, draws):
        return PowerFit("indist", n, "ttt:sgd", 3, {"A": 1.0, "gamma": 0.5, "F": pred, "pred": pred},
                        {"pred": (pred - 0.001, pred + 0.001), "F": (pred - 0.001, pred + 0.001)}, 3, 0,
                        pred_draws=np.array(draws))
    one = "\n".join(prediction_table([fit(600_000, 0.0005, [0.0004, 0.0005, 0.0006])]))
    assert "One size only" in one and "records above" in one and "extrapolated" not in one.split("\n\n", 1)[1]
    # Δ at D/N 200 linear in ln N: the extrapolation to the records' N is exact, its draws too
    sizes = [600_000, 2_000_000, 8_000_000]
    line = lambda n, a=0.0001, b=0.0002: a + b * math.log(n / 600_000)  # noqa: E731
    fits = [fit(n, line(n), [line(n, b=0.0001), line(n), line(n, b=0.0003)]) for n in sizes]
    ((setting, key, k, est, ci),) = size_extrapolation(fits)
    assert (setting, key, k) == ("indist", "ttt:sgd", 3) and est == pytest.approx(line(RECORD_N))
    assert ci[0] == pytest.approx(line(RECORD_N, b=0.0001), rel=0.05) and ci[1] > est
    text = "\n".join(prediction_table(fits))
    assert "One size only" not in text and "(extrapolated from 3 sizes" in text


def test_missing_cells_are_listed_with_their_commands():
    from metattt.study.report import missing_list

    def cell(m, e):
        return SimpleNamespace(cell=SimpleNamespace(model=SimpleNamespace(name=m), ev=SimpleNamespace(name=e)))
    lines = missing_list([cell("a.dn25", "indist"), cell("a.dn25", "fineweb"), cell("b", "indist")], "C.toml")
    assert lines[0].startswith("**Still missing** (3 configured cells")
    assert lines[2] == ("- `a.dn25`: `indist`, `fineweb` — "
                        "`python experiments/ceiling.py --config C.toml --only a.dn25`")
    assert lines[3].endswith("--only b`")


# ---------------------------------------------------------------- the CPU variant, end to end

@pytest.fixture(scope="module")
def ladder_study(tmp_path_factory):
    """experiments/ceiling_ladder_cpu.toml run once on a build of generated text, as its header says; run again it
    resumes (every model and cell done) and the report stays the same."""
    root = tmp_path_factory.mktemp("ladder")
    _, report = run_cpu_study(root, "ceiling_ladder_cpu.toml", [])
    return root, report


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cpu_ladder_tables_are_the_run_directories(ladder_study):
    from report_tables import parse_summary, parse_tables

    root, report = ladder_study
    study = root / "study"
    models = {p.name.rsplit("-", 1)[0]: p for p in (study / "models").iterdir() if p.is_dir()}
    assert sorted(models) == ["s.dn1", "s.dn2", "s.wsd", "xs.dn0.5", "xs.dn1", "xs.dn2", "xs.wsd"]
    rows = parse_summary(report)
    tables = parse_tables(report)
    assert sorted(rows) == sorted((m, s) for m in ("s.dn1", "s.dn2", "xs.dn0.5", "xs.dn1", "xs.dn2")
                                  for s in ("indist", "other"))
    for (model, setting), row in rows.items():
        summ = _json(models[model] / "summary.json")
        br = summ["branch"]
        parent = Path(br["parent_run"])
        plan = {b["label"]: b for b in _json(parent / "budgets.json")["budgets"]}
        label = model.split(".", 1)[1]
        assert br["from_step"] == plan[label]["step"] and br["budget"] == plan[label]
        assert summ["steps"] == br["from_step"] + br["decay_steps"]
        assert _json(models[model] / "config.json")["branch_from"].startswith(str(parent))
        n = br["budget"]["n_params"]
        assert row["N"] == f"{n:,}" and row["capped"] == ("yes" if br["budget"]["capped"] else "no")
        assert row["D/N trained"] == f"{summ['train_tokens'] / n:.1f}"
        (cell,) = (study / "cells" / model).glob(f"{setting}-*")
        ev = _json(cell / "eval.json")
        for proto in ("flat", "sliding", "ttt:sgd"):
            assert row[f"{proto} bpb"] == f"{ev['protocols'][proto]['bpb']:.5f}"
        for key in ("context", "ttt:sgd"):
            d = ev["deltas"][key]
            assert row[f"Δ {key}"] == f"{d['value']:+.5f}"
            assert row[f"Δ {key} 95% CI"] == f"[{d['ci95'][0]:.5f}, {d['ci95'][1]:.5f}]"
        assert row["interval"] == "documents, one order"  # one order per cell in this variant
        assert tables[str(cell)]["ttt:sgd"]["main:bpb"] == f"{ev['protocols']['ttt:sgd']['bpb']:.5f}"
        if setting == "indist":  # the trainer scored the in-distribution split: the same data
            assert ev["meta"]["data_check"] == "match"
    assert rows[("s.dn2", "indist")]["capped"] == "yes" and rows[("xs.dn2", "indist")]["capped"] == "no"
    # the val sets are the build's two: the in-distribution split and the official-style prefix
    (cell,) = (study / "cells" / "xs.dn1").glob("other-*")
    assert _json(cell / "eval.json")["meta"]["data_check"].startswith("other data allowed")
    # one fit per validation set and Δ, over the smaller size's three budgets
    lines = report.splitlines()
    by_size = [line for line in lines if line.startswith(("| indist | 19,526 |", "| other | 19,526 |"))]
    fits = [line for line in by_size if line.count("|") == 15]
    assert len(fits) == 4 and all("| 3 |" in line for line in fits)
    assert not any(line.startswith(("| indist | 75,910 |", "| other | 75,910 |")) for line in lines)
    # the reading at the records' D/N: one row per fit, and the report says it is one size
    assert len([line for line in by_size if line.count("|") == 10]) == 4 and "One size only" in report
    # the continued-training account: the smaller size's branches, S from each cell's ledger, Δ_TTT its own
    accounts = [line for line in lines if line.startswith(("| indist | xs.", "| other | xs."))
                and line.count("|") == 13]
    assert len(accounts) == 6
    for line in accounts:
        setting, model, _dn, s_tok, epochs, dtt = [c.strip() for c in line.strip("|").split("|")][:6]
        (cell,) = (study / "cells" / model).glob(f"{setting}-*")
        ev = _json(cell / "eval.json")
        sgd = ev["protocols"]["ttt:sgd"]
        assert s_tok == f"{sgd['ledger']['n_update_positions']:,}"
        assert epochs == str(sgd["adapter_params"]["config"]["epochs"])
        assert dtt == f"{ev['deltas']['ttt:sgd']['value']:+.5f}"
    # the ceiling: ttt:sgd is each cell's one adapter; within the limit it is the ceiling, with the cell's interval
    from metattt.study.ladder import CEILING_TIME_MULTIPLE

    ceil = {}
    for model in ("s.dn1", "s.dn2", "xs.dn0.5", "xs.dn1", "xs.dn2"):
        for setting in ("indist", "other"):
            (line,) = [ln for ln in lines if ln.startswith(f"| {model} |") and f"| {setting} | 1 |" in ln]
            (cell,) = (study / "cells" / model).glob(f"{setting}-*")
            ev = _json(cell / "eval.json")
            pr = ev["protocols"]
            ratio = pr["ttt:sgd"]["cost"]["device_s_per_token"] / pr["sliding"]["cost"]["device_s_per_token"]
            d = ev["deltas"]["ttt:sgd"]
            if ratio <= CEILING_TIME_MULTIPLE:
                ceil[(model, setting)] = d["value"]
                assert (f"| {d['value']:+.5f} | [{d['ci95'][0]:.5f}, {d['ci95'][1]:.5f}] | ttt:sgd ({setting}) | "
                        f"{ratio:.2f}× | none |") in line
            else:
                assert f"| none within the limit | n/a | n/a | n/a | ttt:sgd ({setting}) {ratio:.2f}× |" in line
            assert f"| none ran in {setting} |" in line or "none within the limit" in line
    # flat across sizes: D/N 1 and 2 hold both sizes (paired: the same documents), D/N 0.5 one. Which sizes have a
    # ceiling depends on the measured time ratios above (CPU timings under load vary), so the expected table is
    # derived from `ceil`: no table at all when no budget has two sizes with a ceiling.
    pairs = {(setting, dn): (ceil.get((f"xs.dn{dn}", setting)), ceil.get((f"s.dn{dn}", setting)))
             for setting in ("indist", "other") for dn in ("1", "2")}
    if not any(a is not None and b is not None for a, b in pairs.values()):
        assert any(ln.startswith("Fewer than 2 sizes at every matched budget") for ln in lines)
        return
    for (setting, dn), (a, b) in pairs.items():
        (line,) = [ln for ln in lines if ln.startswith(f"| {setting} | {dn} |") and ln.count("|") == 12]
        if a is not None and b is not None:
            assert f"| {b - a:+.5f} |" in line and "| paired (same documents) |" in line
            assert f"| {(b - a) / math.log2(75_910 / 19_526):+.5f} |" in line
        else:
            assert "| fewer than 2 sizes |" in line
    for setting in ("indist", "other"):
        (line,) = [ln for ln in lines if ln.startswith(f"| {setting} | 0.5 |")]
        assert "| fewer than 2 sizes |" in line


def _study(parent_flags: list[str], branch_ref: str = "p") -> dict:
    return {"study": {"name": "t", "root": "r", "sections": {"L": "ladder"}},
            "model": [{"name": "p", "train": parent_flags},
                      {"name": "b", "train": ["--branch-from", f"{{model:{branch_ref}}}/budgets/dn1_r0.pt"]}],
            "eval": [{"name": "e", "section": "L", "models": ["b"], "protocols": ["flat"]}]}


def test_model_references_key_on_the_parent_and_train_it_first():
    from metattt.study.config import StudyConfigError, parse_study
    from metattt.study.runner import run_study

    st = parse_study(_study(["--save-at-dn", "1"]))
    p, b = st.model("p"), st.model("b")
    assert b.depends == ("p",) and b.train == ("--branch-from", f"{{study}}/models/p-{p.key}/budgets/dn1_r0.pt")
    assert str(st.model_dir(p)) in st.expand(b.train[1])
    other = parse_study(_study(["--save-at-dn", "2"]))
    assert other.model("b").key != b.key  # a retrained parent makes the branch a new model
    with pytest.raises(StudyConfigError, match=r"\{model:q\} must name a trained model defined above it"):
        parse_study(_study(["--x"], branch_ref="q"))
    log: list[str] = []
    out = run_study(st, dry_run=True, only={"b*"}, log=log.append)  # wildcards; the parent comes along, first
    assert [o.what for o in out] == ["model p", "model b", "cell b/e"]
    assert run_study(st, dry_run=True, only={"x*"}, log=log.append) == []
    assert [o.what for o in run_study(st, dry_run=True, only={"b/e"}, log=log.append)] == ["model p", "model b",
                                                                                         "cell b/e"]
    assert run_study(st, dry_run=True, only={"b/other"}, log=log.append) == []
    # a parent has no cells, yet naming it trains it alone (and nothing else)
    assert [o.what for o in run_study(st, dry_run=True, only={"p"}, log=log.append)] == ["model p"]


# ---------------------------------------------------------------- the ceiling (synthetic eval.json)

def _ceil_cell(model: str, setting: str, n: int, dn: float, protos: dict, nbytes: np.ndarray, *, val: str = "v1",
               runs: dict | None = None, noise: np.ndarray | None = None):
    """A done ladder cell whose protocols are ``name -> (gain over sliding in bpb, seconds per token, legal, mode)``
    on every document (per-document nats = (level − gain)·ln2·bytes, plus ``noise`` nats where given); sliding
    scores 1 s per 100,000 tokens. ``runs``: name -> bpb per run (order 0 first), sliding's included."""
    ln2 = math.log(2)
    nats = {"sliding": 2.0 * ln2 * nbytes}
    entries = {"flat": {"bpb": 2.01, "adapter": None, "mode": "score", "legal": True, "invalid": None,
                        "cost": {"device_s_per_token": 5e-6}},
               "sliding": {"bpb": 2.0, "adapter": None, "mode": "score", "legal": True, "invalid": None,
                           "cost": {"device_s_per_token": 1e-5}}}
    nats["flat"] = 2.01 * ln2 * nbytes
    for name, (gain, spt, legal, mode) in protos.items():
        nats[name] = (2.0 - gain) * ln2 * nbytes + (0 if noise is None else noise)
        entries[name] = {"bpb": 2.0 - gain, "adapter": name.split(":", 1)[1].split("@")[0], "mode": mode,
                         "legal": legal, "invalid": None, "cost": {"device_s_per_token": spt}}
    ev = {"deltas": {"context": {"from": "flat", "to": "sliding", "value": 0.01, "ci95": [0.009, 0.011]}},
          "per_document": {"bytes": nbytes.tolist(), "nats": {k: v.tolist() for k, v in nats.items()}},
          "bootstrap": {"n": 200, "seed": 0, "level": 0.95}, "protocols": entries,
          "meta": {"val": f"{val}/*.bin", "val_fingerprint": f"fp-{val}"}}
    if runs:
        ev["runs"] = {"n_runs": len(runs["sliding"]),
                      "protocols": {k: {"bpb_mean": float(np.mean(v)), "bpb_per_run": list(v)}
                                    for k, v in runs.items()}}
    tokens = int(dn * n)
    summary = {"train_tokens": int(tokens * 1.15),
               "branch": {"budget": {"dn": dn, "n_params": n, "tokens": tokens, "capped": False}}}
    return SimpleNamespace(cell=SimpleNamespace(model=SimpleNamespace(name=model), ev=SimpleNamespace(name=setting)),
                           eval=ev, model_summary=summary)


def test_ceiling_is_the_best_legal_adapter_within_the_time_limit():
    from metattt.study.ladder import CEILING_TIME_MULTIPLE, ceiling_table, ceilings

    assert CEILING_TIME_MULTIPLE == 3.0
    nbytes = np.linspace(500, 1500, 30)
    core = _ceil_cell("a.dn25", "indist", 1000, 25, {"ttt:sgd": (0.002, 2e-5, True, "ttt")}, nbytes)
    ext = _ceil_cell("a.dn25", "indist-ext", 1000, 25, {
        "ttt:sgd": (0.0021, 2e-5, True, "ttt"),
        "ttt:dyneval": (0.004, 2.9e-5, True, "ttt"),     # 2.9× sliding: within the limit, the best there
        "ttt:lora-never": (0.009, 5e-5, True, "ttt"),    # 5× sliding: too slow, the best at any cost
        "ttt:cheat": (0.02, 1e-5, False, "ttt"),         # not legal: never counts
        "docttt:doclora": (0.003, 3.1e-5, True, "docttt"),  # 3.1×: just over
        "oracle:sgd": (0.010, 2e-5, False, "oracle")}, nbytes)
    other = _ceil_cell("a.dn25", "fineweb", 1000, 25, {"ttt:sgd": (0.001, 2e-5, True, "ttt")}, nbytes, val="v2")
    cs = ceilings(ladder_points([core, ext, other]), n_boot=50)
    assert [(c.settings, c.model) for c in cs] == [(["fineweb"], "a.dn25"), (["indist", "indist-ext"], "a.dn25")]
    fw, ind = cs
    assert ind.best.proto == "ttt:dyneval" and ind.best.point.setting == "indist-ext"
    assert ind.best.value == pytest.approx(0.004) and ind.ci == pytest.approx((0.004, 0.004))  # no noise at all
    assert ind.best.time_ratio == pytest.approx(2.9)
    assert ind.best_any.proto == "ttt:lora-never" and ind.best_any.value == pytest.approx(0.009)
    assert sorted(c.proto for c in ind.too_slow) == ["docttt:doclora", "ttt:lora-never"]
    assert ind.n_adapters == 5  # sgd twice, dyneval, lora, doclora; not the cheat, not the oracle
    assert ind.oracle.proto == "oracle:sgd" and ind.fraction == pytest.approx(0.4)
    assert ind.fraction_ci == pytest.approx((0.4, 0.4))
    assert fw.best.proto == "ttt:sgd" and fw.best.value == pytest.approx(0.001) and fw.oracle is None
    assert fw.ci == pytest.approx((0.001, 0.001))  # bootstrapped: no recorded Δ from sliding in this cell
    other.eval["deltas"]["ttt:sgd"] = {"from": "sliding", "to": "ttt:sgd", "value": 0.001, "ci95": [0.0005, 0.0016]}
    assert ceilings(ladder_points([other]), n_boot=10)[0].ci == (0.0005, 0.0016)  # the evaluator's own interval
    # a tighter budget: sgd (2×) of the core cell is then the ceiling on the in-distribution set
    tight = [c for c in ceilings(ladder_points([core, ext]), multiple=2.5, n_boot=20)][0]
    assert tight.best.label == "ttt:sgd (indist-ext)" and tight.best.value == pytest.approx(0.0021)
    assert ceilings(ladder_points([core]), multiple=1.5, n_boot=10)[0].best is None  # nothing within 1.5×
    text = "\n".join(ceiling_table(cs))
    assert "The ceiling (operational definition)" in text and "at most 3× sliding's" in text
    row = next(line for line in text.splitlines() if "| indist, indist-ext |" in line)
    assert ("| +0.00400 | [0.00400, 0.00400] | ttt:dyneval (indist-ext) | 2.90× | "
            "ttt:lora-never (indist-ext) 5.00×, docttt:doclora (indist-ext) 3.10× | "
            "+0.00900 (ttt:lora-never (indist-ext)) | oracle:sgd +0.01000 | 0.400 |") in row
    assert "| none ran in fineweb |" in next(line for line in text.splitlines() if "| fineweb |" in line)


def test_ceiling_mean_over_runs_and_its_interval_on_noisy_documents():
    from metattt.study.ladder import ceilings

    rng = np.random.default_rng(3)
    nbytes = rng.uniform(500, 2000, 80)
    noise = rng.normal(0, 3.0, 80)
    runs = {"sliding": [2.0, 2.001, 1.999], "ttt:sgd": [1.997, 1.9975, 1.9955]}
    c = _ceil_cell("a.dn25", "indist", 1000, 25, {"ttt:sgd": (0.003, 2e-5, True, "ttt")}, nbytes, runs=runs,
                   noise=noise)
    (ce,) = ceilings(ladder_points([c]), n_boot=400)
    order0 = (np.sum(2.0 * math.log(2) * nbytes) - np.sum((2.0 - 0.003) * math.log(2) * nbytes + noise)) \
        / math.log(2) / nbytes.sum()
    per_run = np.array(runs["sliding"]) - np.array(runs["ttt:sgd"])
    want = order0 + per_run.mean() - per_run[0]
    assert ce.best.value == pytest.approx(want, rel=1e-9)
    assert ce.ci[0] < want < ce.ci[1] and ce.ci[1] - ce.ci[0] > 1e-4  # noise and runs widen it


def test_ceiling_against_size_at_a_matched_budget():
    from metattt.study.ladder import flatness, flatness_table

    nbytes = np.linspace(500, 1500, 40)
    noise = np.random.default_rng(5).normal(0, 2.0, 40)
    sizes = {1_000: 0.004, 4_000: 0.003, 16_000: 0.0015}
    cells = [_ceil_cell(f"s{n}.dn25", "indist", n, 25, {"ttt:sgd": (g, 2e-5, True, "ttt")}, nbytes, noise=noise)
             for n, g in sizes.items()]
    # the smallest size also ran dyneval at this budget: not run at every size, so not compared
    cells.append(_ceil_cell("s1000.dn25", "indist-ext", 1_000, 25, {"ttt:dyneval": (0.01, 1e-5, True, "ttt")},
                            nbytes))
    cells.append(_ceil_cell("s1000.dn50", "indist", 1_000, 50, {"ttt:sgd": (0.002, 2e-5, True, "ttt")}, nbytes))
    # a second training seed of a size is another branch at the same budget: the first seed's stands for the size
    cells.append(_ceil_cell("s1000.dn25-s2", "indist", 1_000, 25, {"ttt:sgd": (0.05, 2e-5, True, "ttt")}, nbytes))
    (one, three) = flatness(ladder_points(cells), n_boot=300)
    assert three.dn_requested == 25 and [r.n_params for r in three.rows] == list(sizes) and three.paired
    assert [r.best.proto for r in three.rows] == ["ttt:sgd"] * 3 and three.n_adapters == 1
    assert [r.model for r in three.rows] == ["s1000.dn25", "s4000.dn25", "s16000.dn25"]
    # independently: the Δs (the noise is the same for every size, so it shifts every Δ by the same amount)
    shift = -noise.sum() / math.log(2) / nbytes.sum()
    got = np.array(list(sizes.values())) + shift
    slope = np.polyfit(np.log2(list(sizes)), got, 1)[0]
    assert three.slope == pytest.approx(slope) and slope == pytest.approx((0.0015 - 0.004) / 4, rel=0.1)
    assert three.diff == pytest.approx(0.0015 - 0.004)
    # paired draws: the shared noise cancels in the difference, so its interval is a point
    assert three.diff_ci == pytest.approx((0.0015 - 0.004,) * 2, abs=1e-12)
    assert three.slope_ci[0] <= three.slope <= three.slope_ci[1]
    assert one.dn_requested == 50 and len(one.rows) == 1 and one.slope is None
    text = "\n".join(flatness_table([three, one]))
    assert "Is the ceiling flat across sizes?" in text and "| falls with N |" in text
    assert "| indist | 50 | 1 | 1 |" in text and "fewer than 2 sizes" in text
    only = "\n".join(flatness_table([one]))
    assert "Fewer than 2 sizes at every matched budget" in only and "D/N 50 (indist): 1" in only
    # different documents at two sizes: independent draws, still an interval
    c2 = _ceil_cell("s4000.dn50", "indist", 4_000, 50, {"ttt:sgd": (0.001, 2e-5, True, "ttt")}, nbytes[:30])
    f = next(f for f in flatness(ladder_points(cells + [c2]), n_boot=100) if f.dn_requested == 50)
    assert not f.paired and f.diff == pytest.approx(0.001 - 0.002) and f.diff_ci == pytest.approx((-0.001,) * 2)
