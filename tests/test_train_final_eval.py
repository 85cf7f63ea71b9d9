"""The main job ends with the evaluator's decomposition and the analytic room (metattt.train.final_eval)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from metattt.data.synthetic import SyntheticSpec, load_synthetic_val, protocol_bounds, synthetic_bounds
from metattt.eval.windows import context_starts, sliding_plan
from metattt.train.final_eval import FINAL_EVAL_PLANS, analytic_room, check_mode, decomposition

from test_train import _args

REPO = Path(__file__).resolve().parents[1]


def _entry():
    spec = importlib.util.spec_from_file_location("meta_ttt_entry", REPO / "experiments" / "meta_ttt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bad_mode_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(ValueError, match="--final-eval must be one of short, full, off"):
        check_mode("fast")
    rc = _entry().main(_args(tmp_path, "--iterations", "2", "--final-eval", "fast"))
    assert rc == 2
    assert "--final-eval must be one of" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_main_job_prints_decomposition_with_room_and_shares(tmp_path, capsys):
    # the old corpus design: its shorter documents give the 4,000 scored tokens several documents to resample
    rc = _entry().main(_args(tmp_path, "--iterations", "4", "--run-name", "r", "--meta.adapter", "fomaml:lr=0.01",
                             "--meta.every", "2", "--synthetic-spec", "document-language"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    run = tmp_path / "runs" / "r"
    report = json.loads((run / "eval.json").read_text())
    assert list(report["protocols"]) == ["flat", "sliding", "ttt:sgd", "ttt:meta", "ttt:doc"]
    assert report["meta"]["adapter_specs"] == {"meta": "fomaml:lr=0.01", "doc": "sgd:lr=0.05,reset=doc"}
    assert report["config"]["chunk_tokens"] == FINAL_EVAL_PLANS["short"].chunk_tokens
    # the room, recomputed independently on the scored stream (the whole 4,000-token val split here)
    syn = next(p.parent for p in (tmp_path / "syn").rglob("meta.json"))  # a directory per corpus spec
    meta = json.loads((syn / "meta.json").read_text())
    spec = SyntheticSpec.from_dict(meta["spec"])
    w, stride = report["config"]["context"], report["config"]["stride"]
    val = load_synthetic_val(syn)[: report["data"]["n_tokens"]]
    room = protocol_bounds(spec, val, context_starts(sliding_plan(val.size, w, stride)))["room_bpb"]
    assert room > 0
    dec = decomposition(report)
    assert dec["room"]["room_bpb"] == pytest.approx(room, rel=1e-9)
    rows = {r["protocol"]: r for r in dec["rows"]}
    assert "gain" not in rows["flat"] and "share" not in rows["sliding"]
    assert rows["sliding"]["gain"] == report["deltas"]["context"]["value"]
    for name in ("ttt:sgd", "ttt:meta", "ttt:doc"):
        assert rows[name]["share"] == pytest.approx(report["deltas"][name]["value"] / room, rel=1e-12)
        lo, hi = report["deltas"][name]["ci95"]
        assert rows[name]["share_ci95"] == [pytest.approx(lo / room), pytest.approx(hi / room)]
    assert "== the decomposition" in out and f"bayes_window{w}" in out and f"= {room:.4f} bpb" in out
    ttt_line = next(ln for ln in out.splitlines() if ln.strip().startswith("ttt:sgd"))
    assert f"{100 * rows['ttt:sgd']['share']:.1f}%" in ttt_line
    assert "proj." not in out  # the evaluator's table (and its projection column) is not repeated here
    # a 4-step model is far above its window's bound: the share is flagged as mixing in plain learning
    assert rows["sliding"]["bpb"] - dec["room"]["bayes_window_bpb"] > room and "caution: sliding is" in out


def test_room_from_meta_json_when_it_covers_the_stream(tmp_path):
    from metattt.data.synthetic import make_synthetic_dataset

    spec = SyntheticSpec(vocab_size=64, n_train_tokens=5000, n_val_tokens=6000, min_doc_len=300, max_doc_len=800)
    meta = make_synthetic_dataset(tmp_path / "syn", spec)
    am = {"data": "synthetic", "synthetic_spec": spec.to_dict(), "bounds": meta["bounds"],
          "val_pattern": meta["val_pattern"]}
    full = analytic_room(am, spec.n_val_tokens, 256)
    assert full["source"] == "meta.json"
    assert full["room_bpb"] == meta["bounds"]["bayes_window256_bpb"] - meta["bounds"]["bayes_unknown_bpb"]
    stripped = {**am, "bounds": {k: v for k, v in meta["bounds"].items() if k != "bayes_window256_bpb"}}
    again = analytic_room(stripped, spec.n_val_tokens, 256)
    assert again["source"].startswith("computed") and again["room_bpb"] == pytest.approx(full["room_bpb"], rel=1e-12)
    prefix = analytic_room(am, 2000, 64)  # a prefix: its own bounds, not the whole split's
    ref = synthetic_bounds(spec, load_synthetic_val(tmp_path / "syn")[:2000], windows=(64,))
    assert prefix["room_bpb"] == pytest.approx(ref["bayes_window64_bpb"] - ref["bayes_unknown_bpb"], rel=1e-12)
    assert analytic_room({"data": "shards"}, 2000, 64) is None  # real data has no analytic bounds


def test_decomposition_of_a_single_document_prints_na_intervals():
    """One scored document: the bootstrap has no interval and eval.json spells its bounds "NaN"."""
    from metattt.train.final_eval import format_decomposition

    report = {"meta": {"artifact_meta": {}}, "data": {"n_tokens": 100, "n_targets": 99, "n_docs": 1},
              "config": {"context": 16, "stride": 8},
              "protocols": {"sliding": {"bpb": 5.0, "ci95": ["NaN", "NaN"], "legal": True, "mode": "score"},
                            "ttt:sgd": {"bpb": 4.9, "ci95": ["NaN", "NaN"], "legal": True, "mode": "ttt"}},
              "deltas": {"ttt:sgd": {"value": 0.1, "ci95": ["NaN", "NaN"]}}}
    dec = decomposition(report)
    out = format_decomposition(dec, report, "short")
    sliding = next(ln for ln in out.splitlines() if ln.strip().startswith("sliding"))
    assert "TTT +0.1000 [n/a, n/a]" in out and "[n/a, n/a]" in sliding
