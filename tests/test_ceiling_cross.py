"""The report's cross-model table: a model's Δ minus the reference model's, paired over the same documents."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from metattt.data.bpb import LN2
from metattt.study.report import CellResult, cross_model_table, cross_setting_table


def _result(model: str, nats: dict[str, list[float]], doc_bytes: list[float], setting: str = "meta",
            section: str = "2", flags: tuple[str, ...] = ("--max-tokens", "4096")) -> CellResult:
    by = np.asarray(doc_bytes)
    bpb = {k: float(np.sum(v) / LN2 / by.sum()) for k, v in nats.items()}
    deltas = {"context": {"from": "flat", "to": "sliding", "value": bpb["flat"] - bpb["sliding"]},
              "ttt:sgd": {"from": "sliding", "to": "ttt:sgd", "value": bpb["sliding"] - bpb["ttt:sgd"]}}
    ev = {"deltas": deltas, "bootstrap": {"n": 400, "seed": 0, "level": 0.95},
          "per_document": {"bytes": list(doc_bytes), "nats": nats}}
    protocols = {k: {"bpb": v} for k, v in bpb.items()}
    ev["protocols"] = protocols
    cell = SimpleNamespace(ev=SimpleNamespace(name=setting, section=section, flags=flags),
                           model=SimpleNamespace(name=model))
    return CellResult(cell, Path("x"), ev, {}, None, None)


def test_difference_of_deltas_is_paired_over_documents() -> None:
    rng = np.random.default_rng(0)
    n = 40
    by = list(rng.uniform(500, 3000, n))
    flat = rng.uniform(1000, 5000, n)
    sl = flat - rng.uniform(0, 200, n)
    ref = {"flat": list(flat), "sliding": list(sl), "ttt:sgd": list(sl - rng.uniform(0, 300, n))}
    extra = np.asarray(by) * LN2 * 0.01  # the model gains exactly 0.01 bpb more from TTT on every document
    mod = {**ref, "ttt:sgd": list(np.asarray(ref["ttt:sgd"]) - extra)}
    lines = cross_model_table([_result("none", ref, by), _result("fomaml", mod, by)])
    rows = {ln.split("|")[2].strip(): ln for ln in lines if ln.startswith("| `fomaml`")}
    ttt = [c.strip() for c in rows["sliding → ttt:sgd"].split("|")]
    assert float(ttt[5]) == pytest.approx(0.01, abs=1e-5)
    lo, hi = (float(x) for x in ttt[6].strip("[]").split(","))
    assert lo == pytest.approx(0.01, abs=1e-5) and hi == pytest.approx(0.01, abs=1e-5)  # paired: no spread at all
    ctx = [c.strip() for c in rows["flat → sliding"].split("|")]
    assert float(ctx[5]) == pytest.approx(0.0, abs=1e-9)


def test_settings_of_one_section_with_the_same_flags_are_one_comparison() -> None:
    """A model with its own protocol list (e.g. MetaSGD's learned rates) is still paired with the reference model of
    its section; other flags, other sections and the reference model's own other settings are not."""
    rng = np.random.default_rng(2)
    n = 30
    by = list(rng.uniform(500, 3000, n))
    flat = rng.uniform(1000, 5000, n)
    ref = {"flat": list(flat), "sliding": list(flat - 40), "ttt:sgd": list(flat - 90)}
    mod = {**ref, "ttt:sgd": list(np.asarray(ref["ttt:sgd"]) + np.asarray(by) * LN2 * 0.003)}
    lines = cross_model_table([_result("none", ref, by), _result("metasgd", mod, by, setting="meta-metasgd"),
                               _result("none", ref, by, setting="meta-extra"),
                               _result("other", mod, by, setting="meta-x", flags=("--max-tokens", "8192")),
                               _result("third", mod, by, setting="cap", section="3")])
    assert lines[0].startswith("**`meta`, `meta-metasgd`, `meta-extra`: each model's Δ minus `none`'s")
    rows = [ln for ln in lines if ln.startswith("| `")]
    assert {ln.split("|")[1].strip() for ln in rows} == {"`metasgd` vs `none`"}
    ttt = [c.strip() for c in next(ln for ln in rows if "ttt:sgd" in ln).split("|")]
    assert float(ttt[5]) == pytest.approx(-0.003, abs=1e-5)


def test_other_documents_are_not_paired() -> None:
    by = [1000.0, 2000.0, 1500.0]
    nats = {"flat": [900.0, 1900.0, 1400.0], "sliding": [880.0, 1850.0, 1390.0], "ttt:sgd": [870.0, 1800.0, 1300.0]}
    assert cross_model_table([_result("a", nats, by), _result("b", nats, [1000.0, 2000.0, 1501.0])]) == []


def test_settings_of_one_sweep_are_paired_per_protocol_and_delta() -> None:
    rng = np.random.default_rng(1)
    n = 30
    by = list(rng.uniform(500, 3000, n))
    flat = rng.uniform(1000, 5000, n)
    bf16 = {"flat": list(flat), "sliding": list(flat - 50), "ttt:sgd": list(flat - 120)}
    worse = np.asarray(by) * LN2 * 0.002  # float32 scores TTT 0.002 bpb worse on every document, the rest equal
    fp32 = {**bf16, "ttt:sgd": list(np.asarray(bf16["ttt:sgd"]) + worse)}
    other = _result("m2", bf16, by, "numerics.no-autocast=false")  # another model's sweep: its own table
    lines = cross_setting_table([_result("m", bf16, by, "numerics.no-autocast=false"),
                                 _result("m", fp32, by, "numerics.no-autocast=true"), other])
    rows = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")] for ln in lines if ln.startswith("| `no-")}
    assert float(rows["bpb ttt:sgd"][5]) == pytest.approx(0.002, abs=1e-6)
    assert float(rows["bpb flat"][5]) == pytest.approx(0.0, abs=1e-9)
    assert float(rows["sliding → ttt:sgd"][5]) == pytest.approx(-0.002, abs=1e-6)
    assert sum("`numerics` on" in ln for ln in lines) == 1  # m2 has one setting only: nothing to pair
