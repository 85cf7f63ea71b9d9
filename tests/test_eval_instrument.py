"""Study instrument v2 (issue 26): per-position decomposition, document orders and the hierarchical bootstrap,
the equivalence test, the precision handed to test-time updates, eval.json schema 2 and its readers.

A tiny random-init model on a short random stream (no training): these tests check accounting, not gains."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metattt.data.bpb import ByteLUT
from metattt.eval import orders as ord_
from metattt.eval.equivalence import equivalence_table, holm, tost
from metattt.eval.positions import doc_offsets, per_position, stream_buckets
from metattt.eval.protocols import EvalConfig, evaluate, parse_protocols, prepare_stream
from metattt.eval.report import SCHEMA, build_report, format_report
from metattt.track.rundir import READABLE_EVAL_SCHEMAS
from metattt.eval.stats import bootstrap, hierarchical_bootstrap
from metattt.model.gpt import BankedGPT
from metattt.ttt.registry import make_adapter
from tiny import tiny_config

LN2 = math.log(2.0)
CFG = EvalConfig(seq_len=64, context=64, stride=16, chunk_tokens=256, batch_tokens=2048, n_boot=50)


def _stream(n=2400, seed=0, doc_len=(40, 400)):
    """Random tokens cut into documents of random lengths (BOS = 1 at the start of each)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(4, 64, size=n)
    pos = 0
    while pos < n:
        toks[pos] = 1
        pos += int(rng.integers(*doc_len))
    return toks


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only contend
    torch.manual_seed(0)
    model = BankedGPT(tiny_config()).eval()
    with torch.no_grad():  # output-side matrices start at zero: give them weight so nats vary per token
        model.qo_bank[2:].normal_(std=0.05)
        model.mlp_down_bank.normal_(std=0.05)
    yield model
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ precision
def test_adapt_receives_and_uses_the_evaluators_precision(tiny, monkeypatch):
    """The evaluator hands its autocast choice to every test-time update, and Adapter.adapt enters autocast with
    exactly that choice (on CUDA: bf16 or float32; the GPU test checks the numerics)."""
    import metattt.ttt.adapter as adapter_mod

    seen = []
    real = adapter_mod.autocast_for

    def spy(device, enabled=True):
        seen.append(enabled)
        return real(device, enabled)

    monkeypatch.setattr(adapter_mod, "autocast_for", spy)
    data = prepare_stream(_stream(600), ByteLUT.uniform(64), "cpu", 256)
    for autocast in (False, True):
        seen.clear()
        cfg = EvalConfig(**{**CFG.to_dict(), "autocast": autocast, "n_boot": 0})
        evaluate(tiny, data, parse_protocols("ttt:sgd"), {"sgd": make_adapter("sgd", lr=0.01).bind(tiny)}, cfg)
        assert seen and set(seen) == {autocast}


# ------------------------------------------------------------------------------------------------ per position
def _fake_results(nll: dict, data, adapters=()):
    out = {}
    for n, v in nll.items():
        mode = "ttt" if n in adapters else "score"
        spec = SimpleNamespace(mode=mode, windows="sliding", adapter="x" if mode == "ttt" else None, legal=True)
        st = SimpleNamespace(token_nll=np.asarray(v, dtype=np.float32), adapt_stats=[{}])
        out[n] = SimpleNamespace(spec=spec, stream=st, adapter_info=None,
                                 doc_nats=np.bincount(data.doc_of_target, weights=np.asarray(v, np.float64),
                                                      minlength=data.n_docs))
    return out


def test_per_position_buckets_sum_to_the_totals(tiny):
    """Every cut is a partition: targets and bytes add up exactly; nats exactly on dyadic values (a real run:
    up to summation order); bucket shares add up to the total Δ."""
    toks = _stream(3000, seed=3)
    toks[1:2600] = np.where(toks[1:2600] == 1, 5, toks[1:2600])  # one 2600-token document: offsets past 2048
    data = prepare_stream(toks, ByteLUT.uniform(64), "cpu", 256)
    rng = np.random.default_rng(0)
    n = data.n_tokens - 1
    dy = {"a": rng.integers(1, 4096, n) / 1024.0, "b": rng.integers(1, 4096, n) / 1024.0}  # exact in float32/64
    pp = per_position(data, _fake_results(dy, data, ("b",)), {"ab": ("a", "b")})
    for cut in ("doc_position", "stream_decile"):
        c = pp[cut]
        assert sum(c["targets"]) == n and sum(c["bytes"]) == float(data.target_bytes.sum())
        for name, v in dy.items():
            assert sum(c["nats"][name]) == float(np.sum(v))  # exact: dyadic values
        total_delta = (np.sum(dy["a"]) - np.sum(dy["b"])) / LN2 / data.target_bytes.sum()
        assert sum(c["delta"]["ab"]["share"]) == pytest.approx(total_delta, abs=1e-12)
    assert all(t > 0 for t in pp["doc_position"]["targets"])  # all four default buckets are populated here
    # a real evaluation: the report's per_position agrees with the protocol totals
    ev = evaluate(tiny, data, parse_protocols("flat,doc-flat"), {}, CFG)
    rep = build_report(ev)
    for name, r in ev.results.items():
        for cut in ("doc_position", "stream_decile"):
            assert sum(rep["per_position"][cut]["targets"]) == r.stream.n_scored
            assert math.fsum(rep["per_position"][cut]["nats"][name]) == pytest.approx(r.nats, rel=1e-12)


def test_offsets_count_from_the_documents_bos():
    toks = np.array([1, 5, 6, 7, 1, 8, 9, 1, 4])
    data = prepare_stream(toks, ByteLUT.uniform(64), "cpu", 4)
    # targets 1..8: doc 0 = 5 6 7 and the next BOS; doc 1 = 8 9 and the BOS; doc 2 = 4
    assert doc_offsets(data.doc_of_target, data.starts).tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert stream_buckets(20, 10).tolist() == [i // 2 for i in range(20)]


def test_a_late_gain_lands_in_the_late_deciles():
    """A constructed stream where the adapter only gains in the last 30% of the stream: its Δ is zero in
    deciles 1-7, positive in 8-10, and the late shares add up to the whole Δ."""
    data = prepare_stream(_stream(5001, seed=1), ByteLUT.uniform(64), "cpu", 256)
    n = data.n_tokens - 1
    base = np.full(n, 3.0)
    late = base.copy()
    late[int(0.7 * n):] = 2.0
    pp = per_position(data, _fake_results({"sliding": base, "ttt:late": late}, data, ("ttt:late",)),
                      {"ttt:late": ("sliding", "ttt:late")})
    d = pp["stream_decile"]["delta"]["ttt:late"]
    assert all(v == 0 for v in d["value"][:7]) and all(v > 0.5 for v in d["value"][7:])
    total = (base.sum() - late.sum()) / LN2 / data.target_bytes.sum()
    assert sum(d["share"][7:]) == pytest.approx(total, rel=1e-12)


def test_reset_doc_without_a_step_is_flagged_and_carried_is_reported(tiny):
    """reset=doc with chunks longer than every document takes no step: flagged as zero by construction; with
    short chunks it steps, and the carried comparison beside reset=never is reported."""
    data = prepare_stream(_stream(700, seed=2, doc_len=(60, 200)), ByteLUT.uniform(64), "cpu", 1024)
    ads = {"d": make_adapter("sgd", lr=0.01, reset="doc", select="gains").bind(tiny),
           "n": make_adapter("sgd", lr=0.01, reset="never", select="gains").bind(tiny)}
    long_cfg = EvalConfig(**{**CFG.to_dict(), "chunk_tokens": 1024})
    ev = evaluate(tiny, data, parse_protocols("ttt:d@flat,ttt:n@flat"), ads, long_cfg)
    pp = build_report(ev)["per_position"]
    assert "ttt:d@flat" in pp["zero_by_construction"] and "no document spans" in pp["zero_by_construction"]["ttt:d@flat"]
    assert pp["carried"][0]["within_doc"] == "ttt:d@flat" and pp["carried"][0]["within_doc_updates"] == 0
    short = EvalConfig(**{**CFG.to_dict(), "chunk_tokens": 64})
    data = prepare_stream(data.tokens_np, ByteLUT.uniform(64), "cpu", 64)
    ev = evaluate(tiny, data, parse_protocols("ttt:d@flat,ttt:n@flat"), ads, short)
    pp = build_report(ev)["per_position"]
    assert "ttt:d@flat" not in pp["zero_by_construction"] and pp["carried"][0]["within_doc_updates"] > 0
    assert "carried across documents" in format_report(build_report(ev))


# ------------------------------------------------------------------------------------------------ orders
def test_orders_keep_every_documents_targets_and_bytes():
    toks = _stream(3000, seed=4)
    lut = ByteLUT.uniform(64)
    base = prepare_stream(toks, lut, "cpu", 256)
    perm = ord_.order_permutation(toks, 1, 3)
    assert sorted(perm.tolist()) == list(range(base.n_docs)) and perm[-1] == base.n_docs - 1
    assert not np.array_equal(perm, np.arange(base.n_docs))
    assert np.array_equal(ord_.order_permutation(toks, 1, 0), np.arange(base.n_docs))
    p = prepare_stream(ord_.permute_documents(toks, 1, perm), lut, "cpu", 256)
    assert np.array_equal(ord_.to_original(p.doc_bytes, perm), base.doc_bytes)
    assert np.array_equal(ord_.order_permutation(toks, 1, 3), perm)  # a fixed seed per order


def test_stateless_protocols_are_order_invariant_bit_for_bit(tiny):
    """doc-flat, doc-sliding and doc-chunk never see another document: on every order, each document's nats
    are bit for bit those of the original order; flat (which crosses documents) is not."""
    toks = _stream(2400, seed=5)
    lut = ByteLUT.uniform(64)
    specs = parse_protocols("flat,doc-flat,doc,doc-chunk@chunk=16/window=64")
    base = evaluate(tiny, prepare_stream(toks, lut, "cpu", 256), specs, {}, CFG)
    runs = ord_.evaluate_runs(tiny, toks, lut, "cpu", specs, lambda s: {}, CFG, orders=3, seeds=1)
    assert [(r["order"], r["seed"]) for r in runs] == [(1, 0), (2, 0)]
    for r in runs:
        for name in ("doc-flat", "doc-sliding", "doc-chunk@chunk=16/window=64"):
            assert np.array_equal(r["doc_nats"][name], base.results[name].doc_nats), name
        assert not np.array_equal(r["doc_nats"]["flat"], base.results["flat"].doc_nats)


def test_hierarchical_interval_is_not_narrower_with_order_variance():
    """R runs whose per-document nats differ by an order effect: the runs -> documents interval of the bpb and
    of a paired Δ is at least as wide as the one-order document interval, for every bootstrap seed tried."""
    rng = np.random.default_rng(0)
    D, R = 300, 6
    nbytes = rng.integers(200, 2000, D).astype(np.float64)
    doc = nbytes * rng.normal(1.0, 0.05, D)
    order_effect = rng.normal(0, 0.03, R)  # a stateful adapter's trajectory: each order shifts every document
    ttt = np.stack([doc * (0.97 + e) for e in order_effect])
    base = np.stack([doc] * R)
    for seed in range(5):
        one, one_d = bootstrap({"s": base[0], "t": ttt[0]}, nbytes, [("s", "t")], n_boot=400, seed=seed)
        hi, hi_d = hierarchical_bootstrap({"s": base, "t": ttt}, nbytes, [("s", "t")], n_boot=400, seed=seed)
        assert hi["t"].hi - hi["t"].lo >= one["t"].hi - one["t"].lo
        assert hi_d[("s", "t")].hi - hi_d[("s", "t")].lo >= one_d[("s", "t")].hi - one_d[("s", "t")].lo
    # the point is the mean over runs; identical runs give the one-order point
    assert hi["t"].point == pytest.approx(np.mean(ttt.sum(1)) / LN2 / nbytes.sum())
    same, _ = hierarchical_bootstrap({"s": base}, nbytes, n_boot=0)
    assert same["s"].point == pytest.approx(one["s"].point)


# ------------------------------------------------------------------------------------------------ equivalence
def test_tost_rejects_and_accepts_on_constructed_cases():
    rng = np.random.default_rng(0)
    tight = rng.normal(0.0, 0.002, 2000)  # mean ~0, SE ~4.5e-5: equivalent within 0.001
    assert tost(tight, 0.001)["p"] < 1e-6
    shifted = rng.normal(0.004, 0.002, 2000)  # a real effect of 0.004: not equivalent
    assert tost(shifted, 0.001)["p"] > 0.99
    noisy = rng.normal(0.0, 0.2, 50)  # mean ~0 but SE ~0.03: absence of evidence, not evidence of absence
    assert tost(noisy, 0.001)["p"] > 0.3
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, float("nan")])[0] == 0.5
    # on per-document nats: equal protocols are equivalent, a 0.01-bpb shift is not; Holm over the table
    D = 500
    nbytes = np.full(D, 1000.0)
    a = rng.normal(700, 20, D)
    b = a - rng.normal(0, 0.05, D)
    c = a - 0.01 * LN2 * 1000
    tab = equivalence_table({"a": a, "b": b, "c": c}, nbytes, {"ttt:b": ("a", "b"), "ttt:c": ("a", "c")}, 0.001)
    assert tab["rows"]["ttt:b"]["equivalent"] and not tab["rows"]["ttt:c"]["equivalent"]
    assert tab["rows"]["ttt:c"]["estimate"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="margin"):
        tost(tight, 0.0)


# ------------------------------------------------------------------------------------------------ CLI, schema
def test_cli_orders_eval_json_schema_2_and_readers(tmp_path, tiny):
    """--orders 2 end to end: schema 2, the runs section with hierarchical intervals, per_position, the
    equivalence table and the interval labels; the compare and study readers accept it, and refuse an unknown
    schema with a clear message."""
    from metattt.artifact.model_io import save_model_artifact
    from metattt.data.shards import write_shard
    from metattt.eval.run import main

    torch.manual_seed(0)
    art = tmp_path / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, BankedGPT(tiny_config()), meta={"lut": ByteLUT.uniform(64).to_dict()},
                        allow_over_budget=True)
    write_shard(tmp_path / "val_000.bin", _stream(1500, seed=6).astype(np.uint16))
    rc = main([str(art), "--val", str(tmp_path / "val_*.bin"), "--protocols", "doc,ttt:sgd", "--context", "64",
               "--stride", "32", "--chunk-tokens", "256", "--bootstrap", "50", "--orders", "2", "--quiet",
               "--allow-other-data", "--adapter-spec", "sgd:lr=0.01", "--position-buckets", "0,64,256"])
    assert rc == 0
    rep = json.loads((art.parent / "eval.json").read_text())
    assert rep["schema"] == SCHEMA and SCHEMA in READABLE_EVAL_SCHEMAS and "metattt.eval/1" in READABLE_EVAL_SCHEMAS
    runs = rep["runs"]
    assert runs["n_runs"] == 2 and runs["interval"].startswith("hierarchical")
    doc = runs["protocols"]["doc-sliding"]["bpb_per_run"]
    assert doc[0] == doc[1]  # stateless: the same on both orders
    for name, mean in runs["doc_nats_mean"].items():  # per-document nats averaged over the runs (study seeds bootstrap)
        assert sum(mean) / math.log(2) / rep["data"]["n_bytes"] == pytest.approx(
            runs["protocols"][name]["bpb_mean"], rel=1e-9)
    assert rep["protocols"]["ttt:sgd"]["ci95_kind"].startswith("conditional on one order")
    assert rep["per_position"]["doc_position"]["edges"] == [0, 64, 256]
    assert "ttt:sgd" in rep["equivalence"]["rows"]
    from metattt.track.compare import load_run
    from metattt.track.rundir import MalformedRunDir

    assert load_run(art.parent).eval["schema"] == SCHEMA
    for schema, ok in (("metattt.eval/1", True), ("metattt.eval/9", False)):  # old files read, unknown refused
        (art.parent / "eval.json").write_text(json.dumps({**rep, "schema": schema}))
        if ok:
            assert load_run(art.parent).eval["schema"] == schema
        else:
            with pytest.raises(MalformedRunDir, match="schema 'metattt.eval/9' is not one this version reads"):
                load_run(art.parent)
    assert main([str(art), "--orders", "0"]) == 2
    assert main([str(art), "--position-buckets", "5,3"]) == 2


# ------------------------------------------------------------------------------------------------ cost
def test_counted_work_and_the_pareto_front():
    """Hand-computed cases of the FLOPs count and the front."""
    from metattt.eval.cost import Work, docttt_work, flops, window_work
    from metattt.study.plots import pareto_front

    # one document of 70 targets, chunk 16, window 24: chunks 0..4 see 16, 24, 24, 24, 24 positions
    w = docttt_work(np.array([70]), 16, 24, adapt=False)
    assert w.fwd == 112 and w.fwd_attn == 16 ** 2 + 4 * 24 ** 2 and w.bwd == 0
    wa = docttt_work(np.array([70]), 16, 24, adapt=True, phase_targets=70, phase_epochs=2)
    assert wa.bwd == 112 - 24 and wa.train == 140  # the last chunk is not trained; phases: targets x epochs
    assert window_work(np.array([3, 5])) == Work(fwd=8, fwd_attn=34)
    m = BankedGPT(tiny_config())
    banks = sum(getattr(m, b).numel() for b in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"))
    n = banks + 64 * 32  # 2 physical = 2 virtual layers, tied head
    assert flops(Work(fwd=10, fwd_attn=100), m) == 2 * n * 10 + 4 * 2 * 32 * 100
    assert flops(Work(train=1), m) == 3 * flops(Work(fwd=1), m)  # forward + backward = 3 forwards
    assert pareto_front([(1, 3.0), (2, 2.0), (3, 2.5), (1, 3.0), (4, 1.0)]) == [True, True, False, True, True]


def test_tune_on_one_slice_report_on_a_disjoint_one(tmp_path, tiny):
    """--tune-grid picks the lowest-bpb candidate on --tune-slice, the report runs on --report-slice only with
    the chosen spec, and eval.json records both; overlapping slices and a grid without slices exit 2."""
    from metattt.artifact.model_io import save_model_artifact
    from metattt.data.shards import write_shard
    from metattt.eval.run import main
    from metattt.eval.tuning import parse_grid, with_options

    assert parse_grid(["sgd:lr=1|2,epochs=1|3"])["sgd"] == [
        {"lr": "1", "epochs": "1"}, {"lr": "1", "epochs": "3"}, {"lr": "2", "epochs": "1"}, {"lr": "2", "epochs": "3"}]
    assert with_options("sgd:lr=1,select=gains", {"lr": "2"}) == "sgd:select=gains,lr=2"
    art = tmp_path / "run" / "artifact.ptz"
    art.parent.mkdir()
    save_model_artifact(art, tiny, meta={"lut": ByteLUT.uniform(64).to_dict()}, allow_over_budget=True)
    toks = _stream(1500, seed=7, doc_len=(100, 200))
    write_shard(tmp_path / "val_000.bin", toks.astype(np.uint16))
    base = [str(art), "--val", str(tmp_path / "val_*.bin"), "--protocols", "ttt:sgd@flat", "--context", "64",
            "--chunk-tokens", "128", "--bootstrap", "0", "--quiet", "--allow-other-data",
            "--adapter-spec", "sgd:select=gains"]
    rc = main(base + ["--tune-slice", "0:4", "--report-slice", "4:", "--tune-grid", "sgd:lr=0.0|0.05"])
    assert rc == 0
    rep = json.loads((art.parent / "eval.json").read_text())
    t = rep["meta"]["tuning"]
    assert t["tune_docs"] == [0, 4] and t["report_docs"][0] == 4
    cands = t["candidates"]["sgd"]
    best = min(cands, key=lambda c: c["bpb"])
    assert len(cands) == 2 and t["chosen"]["sgd"] == best["spec"]
    assert rep["meta"]["adapter_specs"]["sgd"] == best["spec"]
    starts = np.flatnonzero(toks == 1)
    assert rep["data"]["n_tokens"] == toks.size - starts[4]  # documents 4.. only
    assert main(base + ["--tune-slice", "0:5", "--report-slice", "4:", "--tune-grid", "sgd:lr=0.0|0.05"]) == 2
    assert main(base + ["--tune-grid", "sgd:lr=0.0|0.05"]) == 2
    assert main(base + ["--tune-slice", "0:4"]) == 2


def test_docttt_projection_comes_from_the_batch_cost_model(tiny, monkeypatch):
    """With EvalConfig.docttt_model (on by default on CUDA) a docttt protocol is calibrated first (its untimed
    warm-up) and its full-val projection is the batch-cost model's (scaled by measured / modelled on the data it
    ran: on an H100 doc-chunk's calibration ran 16x slower than its run), not tokens/s x GPUs; other protocols keep
    the timed tokens/s. (On CPU the report shows no projection; here projection_applies is forced.)"""
    import metattt.eval.report as report_mod

    data = prepare_stream(_stream(1200, seed=8), ByteLUT.uniform(64), "cpu", 256)
    cfg = EvalConfig(**{**CFG.to_dict(), "n_boot": 0, "docttt_model": True, "projection_tokens": 50_000})
    ev = evaluate(tiny, data, parse_protocols("docttt:doclora@chunk=16/window=64/docs=4/rank=4"), {}, cfg)
    name = "docttt:doclora@chunk=16/docs=4/window=64/rank=4"
    r = ev.results[name]
    assert r.warmup_s > 0 and r.projection["check_s"] > 0 and r.projection["full_s"] > 0
    assert r.projection["full_targets"] >= 50_000
    monkeypatch.setattr(report_mod, "projection_applies", lambda *_: True)
    rep = build_report(ev)
    p = rep["protocols"][name]
    ratio = r.projection["measured_over_modelled"]  # the model's full-val time, scaled by this run's measurement
    assert ratio == pytest.approx(r.stream.seconds / r.projection["check_s"])
    assert p["projected_full_val_s"] == pytest.approx(r.projection["full_s"] * ratio)
    assert "docttt_model" in p["projection_basis"] and "measured/modelled" in p["projection_basis"]
    flat = rep["protocols"]["doc-flat"]
    assert flat["projected_full_val_s"] == pytest.approx(50_000 / (flat["tokens_per_s"] * 8))
    assert p["cost"]["flops_per_token"] > rep["protocols"]["doc-chunk@chunk=16/docs=4/window=64"]["cost"][
        "flops_per_token"]  # the LoRA's backwards are counted
    assert "batch-cost model" in format_report(rep)
