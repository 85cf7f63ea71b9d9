"""The GPU corpus's design parts (issue 30): document length laws with their exact hazard, content word types,
spec fingerprints of older corpora, and the design-by-bounds search script."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from metattt.data.synthetic import (BOS_ID, NAMED_SPECS, SyntheticSpec, _hazard, _target_nats, document_params,
                                    generate_split, length_pmf, make_chain, named_spec, protocol_bounds)
from metattt.eval.windows import context_starts, sliding_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("law", ["lognormal", "loguniform"])
def test_length_law_nats_are_exact(law: str) -> None:
    """Summed over a document, the hazard's BOS / not-BOS nats are exactly -log P(L) of the law (so every bound
    prices document ends exactly), and the drawn lengths stay in range."""
    spec = SyntheticSpec(vocab_size=40, n_val_tokens=6000, min_doc_len=20, max_doc_len=400, length_dist=law,
                         length_median=60.0, length_sigma=0.8, seed=3)
    pmf = length_pmf(spec)
    assert pmf.sum() == pytest.approx(1.0) and np.all(pmf > 0)
    val = generate_split(spec, "val")
    lengths, theta = document_params(spec, "val")
    r = _target_nats(spec, val.astype(np.int64), make_chain(spec), lengths, theta)
    owner = np.cumsum(val == BOS_ID)[:-1] - 1  # the document each target ends or continues (its BOS included)
    per_doc = np.bincount(owner, weights=r["length"])
    n_done = int((val == BOS_ID).sum()) - 1  # documents followed by a BOS (the last one is cut by the stream)
    assert n_done >= 10
    want = -np.log(pmf[lengths[:n_done] - spec.min_doc_len])
    assert np.allclose(per_doc[:n_done], want, rtol=1e-9, atol=1e-9)


def test_uniform_hazard_is_the_general_formula() -> None:
    spec = SyntheticSpec(vocab_size=40, min_doc_len=5, max_doc_len=50)
    k = np.arange(0, 60)
    pmf = length_pmf(spec)
    sf = np.cumsum(pmf[::-1])[::-1]
    i = np.clip(k - 5, 0, pmf.size - 1)
    general = np.where(k < 5, 0.0, np.where(k >= 50, 1.0, pmf[i] / sf[i]))
    assert np.allclose(_hazard(spec, k), general, rtol=1e-12)


def test_content_types_and_old_fingerprints() -> None:
    spec = SyntheticSpec(vocab_size=1024, content_types=1000)
    assert (spec.n_content, spec.n_function, spec.first_content) == (1000, 20, 24)
    assert SyntheticSpec(vocab_size=1024).n_content == 510  # the original half split
    # fields added later are left out at their defaults: corpora written before them keep spec and fingerprint
    assert set(SyntheticSpec().to_dict()) == {"vocab_size", "n_train_tokens", "n_val_tokens", "min_doc_len",
                                              "max_doc_len", "alpha", "function_concentration", "content_prob_min",
                                              "content_prob_max", "shard_tokens", "seed"}
    with pytest.raises(ValueError, match="content_types"):
        SyntheticSpec(vocab_size=64, content_types=60)
    with pytest.raises(ValueError, match="length_dist"):
        SyntheticSpec(length_dist="zipf")


def test_gpu_zero_room_spec_has_no_room() -> None:
    spec = named_spec("gpu-long-zero-room", vocab_size=1024, n_val_tokens=20_000, n_train_tokens=10)
    val = generate_split(spec, "val")
    pb = protocol_bounds(spec, val, context_starts(sliding_plan(val.size, 2048, 64)))
    assert pb["room_bpb"] == 0.0 and pb["window_bpb"] == pytest.approx(pb["document_bpb"])
    assert {k: v for k, v in NAMED_SPECS["gpu-long-zero-room"].items() if k != "shared_theta"} == \
        NAMED_SPECS["gpu-long"]


def _design_module():
    spec = importlib.util.spec_from_file_location("synth_design", ROOT / "experiments" / "synth_design.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_design_script_small_grid(capsys: pytest.CaptureFixture[str]) -> None:
    """Two candidates at a small vocabulary: the table has both, the rooms are window - document, and the choice
    is the feasible one with the larger margin (or none)."""
    mod = _design_module()
    rows = mod.search([0.5, 4.0], [60], [(0.5, 0.8)], ["uniform"], vocab=128, tokens=12_000, context=256,
                      stride=64, seed=0, min_room=0.01)
    assert len(rows) == 2
    for r in rows:
        lg = r["long"]
        assert lg["room"] == pytest.approx(lg["window"] - lg["document"], rel=1e-9) and lg["room"] > 0
        assert lg["ctx"] == pytest.approx(lg["bigram"] - lg["window"])
        assert r["feasible"] == (lg["room"] >= 0.01 and lg["room"] >= lg["ctx"] / 4)
    rc = mod.main(["--alpha", "0.5", "--types", "60", "--cp", "0.5-0.8", "--long-dist", "uniform", "--vocab", "128",
                   "--tokens", "12000", "--context", "256", "--min-room", "0.01"])
    out = capsys.readouterr().out
    assert rc == 0 and "0.5   60" in out
    assert mod.main(["--types", "2000", "--vocab", "128", "--tokens", "1000"]) == 2
    with pytest.raises(SystemExit) as e:
        mod.main(["--cp", "half"])
    assert e.value.code == 2


@pytest.mark.parametrize("shared", [False, True])
def test_document_cache_from_tokens_alone(shared: bool) -> None:
    """The Bayes cache's terms equal the bounds' own (on the val stream, any length law), and a perturbed copy of
    the stream (as the evaluator's audit makes) is scored, not refused: its impossible events cost infinite nats."""
    from metattt.data.synthetic import document_cache_nats

    spec = SyntheticSpec(vocab_size=60, n_train_tokens=10, n_val_tokens=5000, min_doc_len=10, max_doc_len=400,
                         length_dist="lognormal", length_median=50.0, alpha=0.5, content_types=30, seed=2,
                         shared_theta=shared)
    val = generate_split(spec, "val").astype(np.int64)
    r = _target_nats(spec, val, make_chain(spec), *document_params(spec, "val"))
    c = document_cache_nats(spec, val)
    for k in ("length", "posterior", "is_content", "is_bos"):
        assert np.allclose(r[k], c[k], rtol=1e-12, atol=0), k
    bad = val.copy()
    bad[100:110] = 2  # control ids where regular tokens were
    bad[np.flatnonzero(val == BOS_ID)[1:3]] = 10  # two documents run into the next: lengths past the law's range
    cb = document_cache_nats(spec, bad)
    assert np.array_equal(cb["length"][:99], c["length"][:99]) and np.array_equal(cb["posterior"][:99],
                                                                                c["posterior"][:99])
