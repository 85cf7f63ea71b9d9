from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from metattt.data.loaders import TrainLoader, load_val_tokens
from metattt.data.synthetic import (
    BOS_ID,
    GENERATING,
    GENERATOR_VERSION,
    CorpusClashError,
    FIRST_REGULAR,
    META_WINDOWS,
    SyntheticSpec,
    document_params,
    generate_split,
    make_chain,
    make_synthetic_dataset,
    synthetic_bounds,
    synthetic_lut,
)

SMALL = SyntheticSpec(vocab_size=40, n_train_tokens=6000, n_val_tokens=3000, min_doc_len=30, max_doc_len=90,
                      shard_tokens=2500, seed=7)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory) -> tuple[dict, float]:
    out = tmp_path_factory.mktemp("synthetic_default")
    t0 = time.perf_counter()
    meta = make_synthetic_dataset(out)
    return meta, time.perf_counter() - t0


def test_default_generation_is_fast_and_bounds_are_ordered(default_dataset) -> None:
    meta, seconds = default_dataset
    assert seconds < 20, f"default synthetic corpus took {seconds:.1f}s"
    b = meta["bounds"]
    # the design's point: knowing the document helps, learning it from the prefix nearly matches
    assert b["bayes_known_bpb"] < b["bayes_unknown_bpb"] < b["bigram_bpb"] < b["unigram_bpb"]
    assert b["bigram_bpb"] - b["bayes_unknown_bpb"] > 0.5  # a large in-document signal to adapt to
    assert b["bayes_unknown_bpb"] - b["bayes_known_bpb"] < 0.2
    # a reader limited to a short context window is worse than one adapting to the whole document
    assert b["bayes_unknown_bpb"] < b["bayes_window2048_bpb"] < b["bayes_window512_bpb"] < b["bayes_window256_bpb"] \
        < b["bayes_window128_bpb"]
    assert 0.25 < b["content_fraction"] < 0.6
    spec = SyntheticSpec()
    assert meta["n_train_tokens"] == spec.n_train_tokens and meta["lut"] == "uniform"
    val = load_val_tokens(meta["val_pattern"])
    assert val.numel() == spec.n_val_tokens and val[0] == BOS_ID
    assert TrainLoader(meta["train_pattern"], 1024, 8192).n_tokens == spec.n_train_tokens
    # bounds are exact for the written val data
    assert synthetic_bounds(spec, val, windows=META_WINDOWS) == b


def test_deterministic_bytes_and_seed_dependence(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", SMALL)
    make_synthetic_dataset(tmp_path / "b", SMALL)
    c = make_synthetic_dataset(tmp_path / "c", SyntheticSpec(**{**SMALL.to_dict(), "seed": 8}))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["meta.json", "train_000000.bin", "train_000001.bin", "train_000002.bin", "val_000000.bin",
                     "val_000001.bin"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert (tmp_path / "a" / "val_000000.bin").read_bytes() != (tmp_path / "c" / "val_000000.bin").read_bytes()
    assert a["bounds"] != c["bounds"]


def test_reuse_and_regeneration(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path, SMALL)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = make_synthetic_dataset(tmp_path, SMALL)
    assert again["reused"] and not first["reused"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    (tmp_path / "val_000001.bin").unlink()  # damaged directory of the same spec: regenerate
    assert not make_synthetic_dataset(tmp_path, SMALL)["reused"]
    assert {p.name for p in tmp_path.iterdir()} == set(mtimes)  # no generation marker left behind


def test_another_specs_corpus_is_never_deleted(tmp_path: Path) -> None:
    """Issue 17: a second spec in the same directory used to delete and regenerate the corpus silently."""
    make_synthetic_dataset(tmp_path, SMALL)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = SyntheticSpec(**{**SMALL.to_dict(), "vocab_size": 48})
    with pytest.raises(CorpusClashError, match=r"another spec \(.*vocab_size 40 there vs 48 here"):
        make_synthetic_dataset(tmp_path, other)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # shards without our meta.json are of unknown origin: refused too
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "val_000000.bin").write_bytes(b"not ours")
    with pytest.raises(CorpusClashError, match="without a synthetic meta.json"):
        make_synthetic_dataset(foreign, SMALL)
    assert (foreign / "val_000000.bin").read_bytes() == b"not ours"


def test_interrupted_generation_is_resumed_for_its_own_spec_only(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, SMALL)
    (tmp_path / "meta.json").unlink()  # as if killed before meta.json: the generation marker remains
    (tmp_path / GENERATING).write_text(json.dumps({"generator_version": GENERATOR_VERSION, "spec": SMALL.to_dict()}))
    with pytest.raises(CorpusClashError):
        make_synthetic_dataset(tmp_path, SyntheticSpec(**{**SMALL.to_dict(), "seed": 9}))
    assert not make_synthetic_dataset(tmp_path, SMALL)["reused"]
    assert not (tmp_path / GENERATING).exists()


def test_trainer_gives_each_spec_its_own_directory(tmp_path: Path) -> None:
    from metattt.train.data_setup import synthetic_dir

    a, b = SMALL, SyntheticSpec(**{**SMALL.to_dict(), "vocab_size": 48})
    da, db = synthetic_dir(tmp_path, a), synthetic_dir(tmp_path, b)
    assert da != db and da.parent == db.parent == tmp_path
    make_synthetic_dataset(tmp_path, a)  # a corpus already directly in --data-dir is used as is
    assert synthetic_dir(tmp_path, a) == tmp_path and synthetic_dir(tmp_path, b) == db


def test_val_is_independent_of_train_size_and_distinct_from_train() -> None:
    bigger = SyntheticSpec(**{**SMALL.to_dict(), "n_train_tokens": 20000})
    assert np.array_equal(generate_split(SMALL, "val"), generate_split(bigger, "val"))
    assert not np.array_equal(generate_split(SMALL, "train")[:3000], generate_split(SMALL, "val"))


def _slow_bounds(spec: SyntheticSpec, tokens: np.ndarray, window: int = 25) -> dict[str, float]:
    """Straightforward per-token loop implementation of the chain bounds (independent of the vectorised one)."""
    chain = make_chain(spec)
    lengths, theta = document_params(spec, "val")
    nC, alpha, a, b = spec.n_content, spec.alpha, spec.min_doc_len, spec.max_doc_len
    tot = {"bigram": 0.0, "unknown": 0.0, "known": 0.0, "window": 0.0}
    n_bytes, d, k, counts, n_content, start = 0, -1, 0, {}, 0, 0
    for t in range(1, len(tokens)):
        x, y = int(tokens[t - 1]), int(tokens[t])
        if x == BOS_ID:
            d, k, counts, n_content, start = d + 1, 0, {}, 0, t - 1
        h = 1.0 / (b - k + 1) if k >= a else 0.0
        if y == BOS_ID:
            for key in tot:
                tot[key] -= math.log(h)
            continue
        n_bytes += 1
        k += 1
        base = -math.log(1.0 - h)
        c = chain.content_prob[x]
        if y < spec.first_content:
            p = (1 - c) * chain.trans_f[x, y - FIRST_REGULAR]
            probs = {"bigram": p, "unknown": p, "known": p, "window": p}
        else:
            j = y - spec.first_content
            seen = [int(v) for v in tokens[max(start + 1, t - window) : t]]
            n_w = sum(v >= spec.first_content for v in seen)
            probs = {"bigram": c / nC, "known": c * theta[d, j],
                     "unknown": c * (alpha + counts.get(j, 0)) / (nC * alpha + n_content),
                     "window": c * (alpha + seen.count(y)) / (nC * alpha + n_w)}
            counts[j] = counts.get(j, 0) + 1
            n_content += 1
        for key in tot:
            tot[key] += base - math.log(probs[key])
    return {key: v / math.log(2) / n_bytes for key, v in tot.items()}


def test_bounds_match_slow_reference_loop() -> None:
    val = generate_split(SMALL, "val")
    fast = synthetic_bounds(SMALL, val, windows=(25, 10_000))
    slow = _slow_bounds(SMALL, val.astype(np.int64), window=25)
    assert fast["bayes_window25_bpb"] == pytest.approx(slow["window"], rel=1e-10)
    assert fast["bayes_window10000_bpb"] == pytest.approx(fast["bayes_unknown_bpb"], rel=1e-12)
    assert fast["bigram_bpb"] == pytest.approx(slow["bigram"], rel=1e-10)
    assert fast["bayes_unknown_bpb"] == pytest.approx(slow["unknown"], rel=1e-10)
    assert fast["bayes_known_bpb"] == pytest.approx(slow["known"], rel=1e-10)
    # a prefix of the val stream (as an evaluator might score) works too
    part = synthetic_bounds(SMALL, val[:1234])
    assert part["bayes_unknown_bpb"] == pytest.approx(_slow_bounds(SMALL, val[:1234].astype(np.int64))["unknown"])


def test_generated_statistics_follow_the_design() -> None:
    spec = SyntheticSpec(vocab_size=64, n_train_tokens=10, n_val_tokens=60000, min_doc_len=2000, max_doc_len=3000,
                         seed=3)
    chain = make_chain(spec)
    lengths, theta = document_params(spec, "val")
    tok = generate_split(spec, "val").astype(np.int64)
    starts = np.flatnonzero(tok == BOS_ID)
    assert np.array_equal(np.diff(starts) - 1, lengths[: len(starts) - 1])  # documents have the drawn lengths
    # content choice happens with probability c(prev)
    prev, nxt = tok[:-1], tok[1:]
    regular = nxt != BOS_ID
    is_c = nxt >= spec.first_content
    expected = chain.content_prob[prev[regular]].sum()
    assert abs(is_c[regular].sum() - expected) < 4 * math.sqrt(expected)
    # each document's content tokens follow its own theta_d, not the other documents'
    fc = spec.first_content
    for d in range(len(starts) - 1):
        doc = tok[starts[d] + 1 : starts[d + 1]]
        counts = np.bincount(doc[doc >= fc] - fc, minlength=spec.n_content)
        emp = counts / counts.sum()
        own = 0.5 * np.abs(emp - theta[d]).sum()
        others = min(0.5 * np.abs(emp - theta[e]).sum() for e in range(len(theta)) if e != d)
        assert own < 0.1 < others, (d, own, others)
    # function tokens follow the shared chain rows
    x0 = np.bincount(prev[regular & ~is_c]).argmax()
    sel = (prev == x0) & regular & ~is_c
    emp_f = np.bincount(nxt[sel] - FIRST_REGULAR, minlength=spec.n_function) / sel.sum()
    assert 0.5 * np.abs(emp_f - chain.trans_f[x0]).sum() < 0.08


def test_bounds_reject_foreign_tokens_and_spec_errors() -> None:
    val = generate_split(SMALL, "val")
    with pytest.raises(ValueError, match="must start with BOS"):
        synthetic_bounds(SMALL, val[1:])
    other = generate_split(SyntheticSpec(**{**SMALL.to_dict(), "seed": 99}), "val")
    with pytest.raises(ValueError, match="do not match this spec's val stream"):
        synthetic_bounds(SMALL, other)
    with pytest.raises(ValueError, match="vocab_size"):
        SyntheticSpec(vocab_size=4)
    with pytest.raises(ValueError, match="min_doc_len"):
        SyntheticSpec(min_doc_len=10, max_doc_len=5)
    with pytest.raises(ValueError, match="split must be"):
        generate_split(SMALL, "test")


def test_lut_convention() -> None:
    lut = synthetic_lut(SMALL)
    assert lut.vocab_size == SMALL.vocab_size and lut.bos_id == BOS_ID
    assert lut.base_bytes[:4].tolist() == [0, 0, 0, 0] and (lut.base_bytes[4:] == 1).all()


def test_cli_refuses_another_specs_directory_with_exit_2(tmp_path: Path, capsys) -> None:
    from metattt.data.__main__ import main

    small = ["--n-train-tokens", "3000", "--n-val-tokens", "2000", "--min-doc-len", "30", "--max-doc-len", "90"]
    assert main(["synthetic", "--out", str(tmp_path), *small]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main(["synthetic", "--out", str(tmp_path), *small, "--vocab-size", "128"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "vocab_size 256 there vs 128 here" in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
