"""Paired document bootstrap for bpb and bpb differences.

Documents, not tokens, are the independent units (tokens within a document are strongly correlated), so
uncertainty comes from resampling documents. A resample's bpb is Σnats / ln2 / Σbytes over the resampled
documents (the same ratio-of-sums estimator as the point value, never a mean of per-document ratios), and all
protocols share each resample (paired), which is what makes the CI of a difference much narrower than the
CIs of its two terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..data.bpb import bpb


@dataclass(frozen=True)
class Interval:
    point: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | list[float]]:
        return {"value": self.point, "ci95": [self.lo, self.hi]}


def bpb_of(nats: np.ndarray, nbytes: np.ndarray) -> float:
    return bpb(np.sum(nats), np.sum(nbytes))


def _resample_counts(rng: np.random.Generator, n_docs: int, n: int) -> np.ndarray:
    """(n, n_docs) multiplicities of a with-replacement resample of n_docs documents."""
    return rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=n).astype(np.float64)


def bootstrap(
    doc_nats: dict[str, np.ndarray],
    doc_bytes: np.ndarray,
    pairs: Sequence[tuple[str, str]] = (),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 128,
) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Percentile CIs for the bpb of each protocol and for ``bpb(a) - bpb(b)`` of each pair ``(a, b)``.

    ``doc_nats[name]`` and ``doc_bytes`` are per-document sums (same document order for every protocol).
    """
    doc_bytes = np.asarray(doc_bytes, dtype=np.float64)
    d = doc_bytes.size
    names = list(doc_nats)
    for name in names:
        if np.asarray(doc_nats[name]).shape != doc_bytes.shape:
            raise ValueError(f"doc_nats[{name!r}] has shape {np.shape(doc_nats[name])}, doc_bytes {doc_bytes.shape}")
    _check_pairs(pairs, doc_nats)
    point = {n: bpb_of(doc_nats[n], doc_bytes) for n in names}
    mat = np.stack([np.asarray(doc_nats[n], dtype=np.float64) for n in names], axis=1)  # (d, P)

    def draw(rng: np.random.Generator, m: int) -> np.ndarray:
        counts = _resample_counts(rng, d, m)
        return bpb(counts @ mat, (counts @ doc_bytes)[:, None])

    return _resampled(point, names, pairs, d, n_boot, seed, level, block, draw)


def hierarchical_bootstrap(
    run_doc_nats: dict[str, np.ndarray],
    doc_bytes: np.ndarray,
    pairs: Sequence[tuple[str, str]] = (),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 128,
) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Percentile CIs over R runs (document orders x adapter seeds) and documents, for stateful protocols whose
    per-document nats depend on the run: ``run_doc_nats[name]`` is (R, D), documents in one fixed (original)
    order for every run. Each resample draws R runs with replacement, then D documents with replacement; the
    documents are the same in every run (crossed, not nested), so one document draw is shared by the drawn runs.
    The estimate is the mean over the drawn runs of the ratio-of-sums bpb (its bytes are the same in every run);
    the point value is the mean over all runs. With R = 1 it is the one-order document bootstrap; with R > 1 its
    spread adds the run-to-run (order / seed) variance to the document variance, so it is not narrower than the
    one-order interval unless the runs agree."""
    doc_bytes = np.asarray(doc_bytes, dtype=np.float64)
    d = doc_bytes.size
    names = list(run_doc_nats)
    mats = {n: np.atleast_2d(np.asarray(run_doc_nats[n], dtype=np.float64)) for n in names}
    r = {m.shape[0] for m in mats.values()}
    if len(r) != 1 or any(m.shape[1] != d for m in mats.values()):
        raise ValueError(f"run_doc_nats must all be (R, {d}) with one R; got "
                         f"{ {n: m.shape for n, m in mats.items()} }")
    runs = r.pop()
    _check_pairs(pairs, mats)
    point = {n: bpb(np.mean(m.sum(1)), doc_bytes.sum()) for n, m in mats.items()}

    def draw(rng: np.random.Generator, m: int) -> np.ndarray:
        run_w = rng.multinomial(runs, np.full(runs, 1.0 / runs), size=m).astype(np.float64) / runs  # (m, R)
        counts = _resample_counts(rng, d, m)  # (m, D)
        denom = counts @ doc_bytes
        return np.stack([bpb(((run_w @ mats[n]) * counts).sum(1), denom) for n in names], axis=1)

    return _resampled(point, names, pairs, d, n_boot, seed, level, block, draw)


def _check_pairs(pairs: Sequence[tuple[str, str]], have) -> None:
    for a, b in pairs:
        if a not in have or b not in have:
            raise KeyError(f"pair ({a!r}, {b!r}) names a protocol without per-document nats")


def _resampled(point: dict[str, float], names: Sequence[str], pairs: Sequence[tuple[str, str]], d: int,
               n_boot: int, seed: int, level: float, block: int, draw):
    """The intervals of ``n_boot`` resamples drawn ``block`` at a time (``draw(rng, m)`` -> (m, P) bpb); no
    interval (NaN) without resamples or with fewer than two documents."""
    if n_boot <= 0 or d < 2:
        nan = float("nan")
        return ({n: Interval(point[n], nan, nan) for n in names},
                {(a, b): Interval(point[a] - point[b], nan, nan) for a, b in pairs})
    rng = np.random.default_rng(seed)
    samples = np.empty((n_boot, len(names)))
    for done in range(0, n_boot, block):
        m = min(block, n_boot - done)
        samples[done:done + m] = draw(rng, m)
    return _intervals(point, samples, names, pairs, level)


def _intervals(point: dict[str, float], samples: np.ndarray, names: Sequence[str],
               pairs: Sequence[tuple[str, str]], level: float):
    """Percentile intervals of each protocol's bootstrap column and of each pair's difference (paired: the
    same resample in both columns)."""
    q = (1.0 - level) / 2.0
    col = {n: i for i, n in enumerate(names)}

    def interval(pt: float, s: np.ndarray) -> Interval:
        lo, hi = np.quantile(s, [q, 1.0 - q])
        return Interval(pt, float(lo), float(hi))

    per = {n: interval(point[n], samples[:, col[n]]) for n in names}
    diffs = {(a, b): interval(point[a] - point[b], samples[:, col[a]] - samples[:, col[b]]) for a, b in pairs}
    return per, diffs
