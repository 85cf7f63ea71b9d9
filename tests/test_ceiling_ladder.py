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
from metattt.study.plots import ladder_plot

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


# ---------------------------------------------------------------- the CPU variant, end to end

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
         "court law state river city music water light year people time day world house school").split()


def _text(seed: int, n: int, sentences: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(*sentences))) for _ in range(n)]


@pytest.fixture(scope="module")
def ladder_study(tmp_path_factory):
    """experiments/ceiling_ladder_cpu.toml run once on a build of generated text, as its header says."""
    from metattt.data.build import BuildConfig, build_dataset

    sys.path.insert(0, str(REPO / "experiments"))
    import ceiling

    root = tmp_path_factory.mktemp("ladder")
    docs = _text(11, 400, (3, 8))
    books = ["\n".join(_text(100 + k, 45, (2, 4))) for k in range(12)]
    for name, texts in (("docs", docs), ("books", books)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                    for i, t in enumerate(texts)))
    data = root / "data"
    build_dataset(BuildConfig([root / "docs.jsonl"], data / "tok.model", data, val_docs=40,
                              pseudo_doc_text=[root / "books.jsonl"], indist_val_frac=0.1, indist_val_books=3,
                              indist_val_min_tokens=1000, train_tokenizer=True, vocab_size=320, progress=False))
    text = (REPO / "experiments" / "ceiling_ladder_cpu.toml").read_text()
    for key, value in (("root", root / "study"), ("report", root / "report.md"), ("plots", root / "plots")):
        text = text.replace(f'{key} = "', f'{key} = "{value}" # was "', 1)
    cfg = root / "study.toml"
    cfg.write_text(text)
    os.environ["LADDER_CPU_DATA"] = str(data)
    try:
        assert ceiling.main(["--config", str(cfg)]) == 0
        report = (root / "report.md").read_text()
        assert ceiling.main(["--config", str(cfg)]) == 0  # resumed: every model and cell is done
        assert (root / "report.md").read_text() == report
    finally:
        del os.environ["LADDER_CPU_DATA"]
    return root, report


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cpu_ladder_tables_are_the_run_directories(ladder_study):
    from metattt.study.report import parse_summary, parse_tables

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
        for proto in ("flat", "sliding"):
            assert row[f"{proto} bpb"] == f"{ev['protocols'][proto]['bpb']:.5f}"
        for key in ("context", "ttt:sgd"):
            d = ev["deltas"][key]
            assert row[f"Δ {key}"] == f"{d['value']:+.5f}"
            assert row[f"Δ {key} 95% CI"] == f"[{d['ci95'][0]:.5f}, {d['ci95'][1]:.5f}]"
        assert tables[str(cell)]["ttt:sgd"]["main:bpb"] == f"{ev['protocols']['ttt:sgd']['bpb']:.5f}"
        if setting == "indist":  # the trainer scored the in-distribution split: the same data
            assert ev["meta"]["data_check"] == "match"
    assert rows[("s.dn2", "indist")]["capped"] == "yes" and rows[("xs.dn2", "indist")]["capped"] == "no"
    # the val sets are the build's two: the in-distribution split and the official-style prefix
    (cell,) = (study / "cells" / "xs.dn1").glob("other-*")
    assert _json(cell / "eval.json")["meta"]["data_check"].startswith("other data allowed")
    # one fit per validation set and Δ, over the smaller size's three budgets
    fits = [line for line in report.splitlines() if line.startswith(("| indist | 19,526 |", "| other | 19,526 |"))]
    assert len(fits) == 4 and all("| 3 |" in line for line in fits)
    assert not any(line.startswith(("| indist | 75,910 |", "| other | 75,910 |")) for line in report.splitlines())


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
