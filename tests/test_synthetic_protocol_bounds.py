"""The exact Bayes bounds a protocol's scored tokens face (issue 30): per-target contexts, document bound, and the
zero-room control spec."""
from __future__ import annotations

import math

import numpy as np
import pytest

from metattt.data.synthetic import (
    BOS_ID,
    NAMED_SPECS,
    SyntheticSpec,
    document_params,
    generate_split,
    make_chain,
    named_spec,
    protocol_bounds,
    synthetic_bounds,
)
from metattt.eval.windows import context_starts, flat_plan, sliding_plan

SMALL = SyntheticSpec(vocab_size=40, n_train_tokens=10, n_val_tokens=3000, min_doc_len=30, max_doc_len=300,
                      alpha=0.3, seed=11)


def _slow_context_bpb(spec: SyntheticSpec, tokens: np.ndarray, lo: np.ndarray) -> float:
    """Per-token loop: the Bayes reader of ``tokens[lo[t-1]:t]`` (clipped at its document's start)."""
    chain = make_chain(spec)
    nC, alpha, a, b = spec.n_content, spec.alpha, spec.min_doc_len, spec.max_doc_len
    nats, n_bytes, k, start = 0.0, 0, 0, 0
    for t in range(1, len(tokens)):
        x, y = int(tokens[t - 1]), int(tokens[t])
        if x == BOS_ID:
            k, start = 0, t - 1
        h = 1.0 / (b - k + 1) if k >= a else 0.0
        if y == BOS_ID:
            nats -= math.log(h)
            continue
        n_bytes, k = n_bytes + 1, k + 1
        nats -= math.log(1.0 - h)
        c = chain.content_prob[x]
        if y < spec.first_content:
            nats -= math.log((1 - c) * chain.trans_f[x, y - 4])
        else:
            seen = [int(v) for v in tokens[max(start + 1, int(lo[t - 1])) : t]]
            n_w = sum(v >= spec.first_content for v in seen)
            nats -= math.log(c * (alpha + seen.count(y)) / (nC * alpha + n_w))
    return nats / math.log(2) / n_bytes


def test_exact_contexts_give_the_window_bound() -> None:
    """Stride 1: every target sees exactly W tokens (fewer only where bayes_window's reader does too)."""
    val = generate_split(SMALL, "val")
    for w in (7, 40):
        pb = protocol_bounds(SMALL, val, context_starts(sliding_plan(val.size, w, 1)))
        ref = synthetic_bounds(SMALL, val, windows=(w,))
        assert pb["window_bpb"] == pytest.approx(ref[f"bayes_window{w}_bpb"], rel=1e-12)
        assert pb["document_bpb"] == pytest.approx(ref["bayes_unknown_bpb"], rel=1e-12)
        assert pb["room_bpb"] == pytest.approx(pb["window_bpb"] - pb["document_bpb"], rel=1e-9)


def test_sliding_contexts_match_a_slow_loop_and_lie_between_their_windows() -> None:
    val = generate_split(SMALL, "val")
    w, s = 40, 16
    lo = context_starts(sliding_plan(val.size, w, s))
    n_ctx = np.arange(1, val.size) - lo
    assert n_ctx.max() == w and n_ctx[w:].min() == w - s + 1  # W - S + 1 .. W tokens past the first window
    pb = protocol_bounds(SMALL, val, lo)
    assert pb["window_bpb"] == pytest.approx(_slow_context_bpb(SMALL, val.astype(np.int64), lo), rel=1e-10)
    ref = synthetic_bounds(SMALL, val, windows=(w - s + 1, w))
    assert ref[f"bayes_window{w}_bpb"] < pb["window_bpb"] < ref[f"bayes_window{w - s + 1}_bpb"]
    # flat windows give 0..W-1 tokens: a larger room than sliding's
    flat = protocol_bounds(SMALL, val, context_starts(flat_plan(val.size, w)))
    assert flat["room_bpb"] > pb["room_bpb"] > 0
    # per-document sums add up to the totals (a bootstrap resamples documents with their room)
    assert pb["doc_window_nats"].sum() == pytest.approx(pb["window_nats"].sum(), rel=1e-12)
    assert pb["doc_bytes"].sum() == pb["n_bytes"]


def test_zero_room_spec_document_bound_equals_window_bound() -> None:
    spec = SyntheticSpec(**{**SMALL.to_dict(), "shared_theta": True})
    _, theta = document_params(spec, "val")
    assert np.all(theta == theta[0])  # one content distribution for every document
    val = generate_split(spec, "val")
    pb = protocol_bounds(spec, val, context_starts(sliding_plan(val.size, 40, 16)))
    assert pb["document_bpb"] == pytest.approx(pb["window_bpb"], rel=1e-12)
    assert abs(pb["room_bpb"]) < 1e-12
    b = synthetic_bounds(spec, val, windows=(40,))
    assert b["bayes_window40_bpb"] == pytest.approx(b["bayes_unknown_bpb"], rel=1e-12)
    assert b["bayes_known_bpb"] == pytest.approx(b["bayes_unknown_bpb"], rel=1e-12)
    # the same design with a theta per document has room
    ctrl = protocol_bounds(SMALL, generate_split(SMALL, "val"), context_starts(sliding_plan(3000, 40, 16)))
    assert ctrl["room_bpb"] > 0.01


def test_named_specs() -> None:
    zero = named_spec("zero-room", vocab_size=40, n_val_tokens=2000)
    main = named_spec("main-job", vocab_size=40, n_val_tokens=2000)
    assert zero.shared_theta and not main.shared_theta
    assert {**zero.to_dict(), "shared_theta": False} == {**main.to_dict(), "shared_theta": False}
    assert named_spec("document-language") == SyntheticSpec()
    assert "shared_theta" not in SyntheticSpec().to_dict()  # corpora written before the field keep their spec
    assert SyntheticSpec.from_dict(zero.to_dict()) == zero
    with pytest.raises(ValueError, match="unknown synthetic spec 'nope'; choose from"):
        named_spec("nope")
    assert set(NAMED_SPECS) >= {"document-language", "main-job", "zero-room"}


def test_context_starts_validated() -> None:
    val = generate_split(SMALL, "val")
    with pytest.raises(ValueError, match="context_lo needs one start per target"):
        protocol_bounds(SMALL, val, np.zeros(5, dtype=np.int64))
