"""Evaluator core without the real model: window plans, ledger, bootstrap, stub-model scoring."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from metattt.eval.ledger import Ledger, LegalityError
from metattt.eval.scoring import ScoreConfig, run_stream, training_sequences
from metattt.eval.stats import bootstrap, bpb_of
from metattt.eval.windows import (
    batch_windows,
    check_no_bos_crossing,
    doc_ids,
    doc_plan,
    flat_plan,
    make_chunks,
    sliding_plan,
)


def _coverage(plan):
    cnt = np.zeros(plan.n_tokens, dtype=np.int64)
    for s, l, f in zip(plan.start, plan.length, plan.score_from):
        cnt[s + 1 + f : s + 1 + l] += 1
    return cnt


@pytest.mark.parametrize("n", [2, 3, 17, 64, 65, 100, 1000])
@pytest.mark.parametrize("ctx,stride", [(16, 4), (16, 16), (7, 3), (1, 1), (32, 5)])
def test_plans_score_every_target_exactly_once(n, ctx, stride):
    for plan in (flat_plan(n, ctx), sliding_plan(n, ctx, stride)):
        cnt = _coverage(plan)
        assert cnt[0] == 0 and np.all(cnt[1:] == 1), plan.name
        assert np.all(plan.length <= ctx)
        assert np.all(plan.start + plan.length <= n - 1)


def test_sliding_windows_score_last_stride_and_have_full_context():
    plan = sliding_plan(1000, 64, 8)
    assert plan.score_from[0] == 0 and plan.length[0] == 64
    # every window is full length; all but the first and last score exactly `stride` targets
    assert np.all(plan.length == 64)
    assert np.all((plan.length - plan.score_from)[1:-1] == 8)
    # a scored target always sees at least context - stride tokens of history (except at the stream start)
    ctx_seen = plan.score_from[1:]
    assert ctx_seen.min() >= 64 - 8


def test_flat_is_nonoverlapping():
    plan = flat_plan(100, 16)
    assert list(plan.start) == list(range(0, 99, 16))
    assert np.all(plan.score_from == 0)
    assert plan.length[-1] == 99 - 96


def test_validate_catches_gaps_and_overlaps():
    plan = sliding_plan(200, 16, 4)
    bad = type(plan)(plan.name, plan.n_tokens, plan.start, plan.length, plan.score_from.copy())
    bad.score_from[3] += 1  # leaves a gap
    with pytest.raises(AssertionError, match="exactly once"):
        bad.validate()
    bad.score_from[3] -= 2  # overlap
    with pytest.raises(AssertionError, match="exactly once"):
        bad.validate()


def _doc_stream(lengths, seed=0, vocab=50, bos=1):
    rng = np.random.default_rng(seed)
    parts = []
    for L in lengths:
        parts.append(np.concatenate(([bos], rng.integers(4, vocab, size=L))))
    return np.concatenate(parts).astype(np.int64)


@pytest.mark.parametrize("sliding", [True, False])
def test_doc_plan_isolated_and_complete(sliding):
    toks = _doc_stream([5, 40, 1, 17, 90, 3])
    plan = doc_plan(toks, 1, context=16, stride=4, sliding=sliding)
    cnt = _coverage(plan)
    assert np.all(cnt[1:] == 1)
    check_no_bos_crossing(plan, toks, 1)
    # no window input contains a BOS other than at its first position
    for s, l in zip(plan.start, plan.length):
        assert not np.any(toks[s + 1 : s + l] == 1)
    # stream not starting with BOS: the prefix is its own document
    toks2 = toks[3:]
    plan2 = doc_plan(toks2, 1, context=16, stride=4, sliding=sliding)
    assert np.all(_coverage(plan2)[1:] == 1)
    check_no_bos_crossing(plan2, toks2, 1)


def test_bos_crossing_is_detected():
    toks = _doc_stream([10, 10])
    plan = sliding_plan(toks.size, 16, 4)
    with pytest.raises(AssertionError, match="document boundary"):
        check_no_bos_crossing(plan, toks, 1)


def test_doc_ids_assign_next_bos_to_previous_doc():
    toks = np.array([1, 5, 6, 1, 7, 1, 8, 9])
    ids = doc_ids(toks, 1)  # targets 1..7
    assert list(ids) == [0, 0, 0, 1, 1, 2, 2]
    assert list(doc_ids(np.array([5, 6, 1, 7]), 1)) == [0, 0, 1]


def test_chunks_partition_targets():
    plan = sliding_plan(5000, 64, 16)
    chunks = make_chunks(plan, 1000)
    assert chunks[0].lo == 1 and chunks[-1].hi == 5000
    for a, b in zip(chunks, chunks[1:]):
        assert a.hi == b.lo and a.w1 == b.w0
    assert all(c.n_scored > 0 for c in chunks)


def test_batch_windows_respects_budget_and_is_deterministic():
    lengths = np.array([5, 16, 16, 3, 9, 16, 1, 2, 2, 2])
    batches = batch_windows(lengths, 32)
    assert batches[0][0] == 0 and batches[-1][1] == lengths.size
    for (a, b), (c, _) in zip(batches, batches[1:]):
        assert b == c
    for a, b in batches:
        assert b - a == 1 or lengths[a:b].max() * (b - a) <= 32
    uni = np.full(10, 8)
    assert batch_windows(uni, 32) == [(0, 4), (4, 8), (8, 10)]


# ----------------------------------------------------------------------------------------------- ledger
def test_ledger_accepts_score_first_and_rejects_premature_updates():
    led = Ledger("t")
    s = led.next_step(); led.record_score(1, 100, s)
    u = led.next_step(); led.record_update([(0, 100)], u, "ok")
    s = led.next_step(); led.record_score(100, 200, s)
    info = led.verify()
    assert info["legal"] and info["n_updates"] == 1

    led.record_update([(150, 260)], led.next_step(), "peeks")
    s = led.next_step(); led.record_score(200, 300, s)
    with pytest.raises(LegalityError, match=r"update #1 .*peeks.*\[200, 260\)"):
        led.verify()


def test_ledger_oracle_not_enforced_but_reported():
    led = Ledger("oracle", enforce=False)
    led.record_update([(0, 50)], led.next_step())
    led.record_score(1, 50, led.next_step())
    info = led.verify()
    assert not info["legal"] and info["n_violations"] == 1


def test_ledger_double_score():
    led = Ledger("x")
    led.record_score(1, 10, led.next_step())
    led.record_score(5, 12, led.next_step())
    with pytest.raises(LegalityError, match="scored twice"):
        led.verify()


def test_ledger_merges_contiguous_scores():
    led = Ledger("x")
    s = led.next_step()
    for a in range(1, 1000, 10):
        led.record_score(a, a + 10, s)
    assert led.verify()["n_score_intervals"] == 1


def test_ledger_ranks_merge_and_advance_keep_one_order():
    """Two ranks' ledgers (``advance_to`` a common point, ``record_scores`` many rows, ``merge``): the union is
    verified as one run, and an update one rank made before another rank's score is still caught."""
    r0, r1 = Ledger("r"), Ledger("r")
    r0.record_scores(np.array([1, 50]), np.array([50, 100]), r0.next_step())
    r1.record_scores(np.array([100]), np.array([150]), r1.next_step())
    for r in (r0, r1):
        r.advance_to(1000)
    r1.record_update([(0, 150)], r1.next_step(), "after the common point")
    whole = Ledger("r")
    whole.merge([r0, r1])
    info = whole.verify()
    assert info["legal"] and info["n_score_intervals"] == 3 and info["n_updates"] == 1
    assert whole.scores() == [(1, 50, 1), (50, 100, 1), (100, 150, 1)] and whole.updates[0].step == 1001
    r1.record_update([(140, 160)], r1.next_step(), "peeks")
    r1.record_score(150, 200, r1.next_step())
    bad = Ledger("r")
    bad.merge([r0, r1])
    with pytest.raises(LegalityError, match="peeks"):
        bad.verify()
    with pytest.raises(ValueError, match="lo <= hi"):
        bad.record_scores(np.array([5]), np.array([4]), 1)


# ----------------------------------------------------------------------------------------------- stats
def test_bootstrap_point_values_and_sign():
    rng = np.random.default_rng(0)
    nb = rng.integers(100, 1000, size=50).astype(float)
    a = nb * 0.8 * math.log(2)  # exactly 0.8 bpb
    b = nb * 0.7 * math.log(2)
    per, diffs = bootstrap({"a": a, "b": b}, nb, [("a", "b")], n_boot=200, seed=1)
    assert per["a"].point == pytest.approx(0.8) and per["b"].point == pytest.approx(0.7)
    assert diffs[("a", "b")].point == pytest.approx(0.1)
    assert diffs[("a", "b")].lo == pytest.approx(0.1) and diffs[("a", "b")].hi == pytest.approx(0.1)


def test_bootstrap_is_ratio_of_sums_not_mean_of_ratios():
    nb = np.array([1.0, 1000.0])
    nats = np.array([10.0, 1000.0]) * math.log(2)
    assert bpb_of(nats, nb) == pytest.approx(1010 / 1001)
    per, _ = bootstrap({"p": nats}, nb, n_boot=50, seed=0)
    assert per["p"].point == pytest.approx(1010 / 1001)


def test_bootstrap_coverage_planted():
    """Docs with random byte counts and per-byte bpb noise around a known population ratio."""
    true_bpb = 1.1
    hits = 0
    reps = 200
    for r in range(reps):
        rng = np.random.default_rng(1000 + r)
        nb = rng.gamma(2.0, 400.0, size=120)
        bits = nb * true_bpb + rng.normal(0, 1, size=120) * np.sqrt(nb) * 3.0 + rng.normal(0, 0.15, 120) * nb
        per, _ = bootstrap({"p": bits * math.log(2)}, nb, n_boot=300, seed=r)
        hits += per["p"].lo <= true_bpb <= per["p"].hi
    cov = hits / reps
    assert 0.88 <= cov <= 0.99, cov


def test_bootstrap_paired_difference_is_tighter():
    rng = np.random.default_rng(3)
    nb = rng.gamma(2.0, 300.0, size=200)
    difficulty = rng.normal(1.0, 0.3, size=200)
    a = nb * difficulty * math.log(2)
    b = nb * (difficulty - 0.02 + rng.normal(0, 0.005, 200)) * math.log(2)
    per, diffs = bootstrap({"a": a, "b": b}, nb, [("a", "b")], n_boot=400, seed=0)
    width_a = per["a"].hi - per["a"].lo
    d = diffs[("a", "b")]
    assert d.hi - d.lo < width_a / 5
    assert d.lo > 0  # b is better, the paired CI excludes 0


# ----------------------------------------------------------------------------------------------- scoring
class BigramStub(torch.nn.Module):
    """Causal stub: logits depend on the current token and (optionally) an additive 'adapted' bias."""

    def __init__(self, vocab=16, seed=0, context_bonus=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        self.context_bonus = context_bonus

    def forward(self, x, targets=None, *, params=None, reduction="mean"):
        table = (params or {}).get("table", self.table)
        bias = (params or {}).get("bias", self.bias)
        logits = table[x] + bias
        if self.context_bonus:  # position-dependent: more history -> sharper (context helps)
            pos = torch.arange(x.size(1), dtype=logits.dtype)[None, :, None]
            logits = logits * (1 + 0.05 * pos.clamp(max=20))
        return logits.float()


def test_run_stream_matches_direct_computation_for_position_independent_model():
    toks = torch.from_numpy(_doc_stream([30, 50, 20], seed=2, vocab=16))
    model = BigramStub()
    plan = sliding_plan(toks.numel(), 16, 4)
    res = run_stream(model, toks, plan, ScoreConfig(batch_tokens=40, chunk_tokens=25))
    direct = torch.nn.functional.cross_entropy(model.table[toks[:-1]], toks[1:], reduction="none")
    np.testing.assert_allclose(res.token_nll, direct.detach().numpy(), rtol=1e-6)
    assert res.ledger.verify()["legal"]


def test_training_sequences_ranges():
    assert training_sequences(1, 101, 32) == (0, 3, 32)
    assert training_sequences(50, 60, 32) == (49, 1, 10)
    with pytest.raises(ValueError):
        training_sequences(0, 10, 4)


def test_parse_protocols_adds_bases_and_orders():
    from metattt.eval.protocols import parse_protocol, parse_protocols

    names = [s.name for s in parse_protocols("oracle:sgd,ttt:sgd@doc,sliding")]
    assert names == ["flat", "sliding", "doc-sliding", "ttt:sgd@doc-sliding", "oracle:sgd"]
    assert parse_protocol("doc").name == "doc-sliding" and not parse_protocol("oracle:x").legal
    for bad in ("bogus", "ttt:", "ttt:sgd@nowhere", "foo:sgd"):
        with pytest.raises(ValueError):
            parse_protocol(bad)


class ShapeRecorder(torch.nn.Module):
    """Wraps a scorer and records the input shape of every forward (what a compiled scorer would specialise on)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, x, **kw):
        self.shapes.append(tuple(x.shape))
        return self.inner(x, **kw)


@pytest.mark.parametrize("plan_kind", ["sliding", "flat", "doc"])
def test_fixed_shapes_one_forward_shape_same_scores(plan_kind):
    toks = torch.from_numpy(_doc_stream([30, 50, 20, 7], seed=3, vocab=16))
    model = BigramStub(context_bonus=True)  # position-dependent: padding placement would show in the scores
    plan = {"sliding": lambda: sliding_plan(toks.numel(), 16, 4), "flat": lambda: flat_plan(toks.numel(), 16),
            "doc": lambda: doc_plan(toks.numpy(), 1, 16, 4)}[plan_kind]()
    base = ScoreConfig(batch_tokens=40, chunk_tokens=25)
    plain = run_stream(model, toks, plan, base)
    rec = ShapeRecorder(model)
    fixed = run_stream(model, toks, plan, dataclasses.replace(base, fixed_shapes=True), scorer=rec)
    np.testing.assert_allclose(fixed.token_nll, plain.token_nll, rtol=1e-6)
    assert len(set(rec.shapes)) == 1 and len(rec.shapes) > 2, rec.shapes
    assert rec.shapes[0] == (40 // plan.max_length or 1, plan.max_length)
    assert fixed.ledger.verify()["legal"]
