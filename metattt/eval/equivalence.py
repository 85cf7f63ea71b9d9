"""Equivalence tests for "no effect" claims: TOST against a margin, Holm-corrected across one table's adapters.

A Δ whose confidence interval straddles zero is not evidence of no effect; equivalence is: both one-sided tests
(Δ > -margin and Δ < +margin) reject. A paired bpb difference over the same documents is exactly the mean of
per-document terms ``z_d = D * (nats_A[d] - nats_B[d]) / ln2 / sum(bytes)`` (bytes are the same for both
protocols), so each one-sided test is a one-sample t-test on ``z`` (``scipy.stats.ttest_1samp``). With several
runs (document orders / adapter seeds) ``z`` is averaged over the runs per document first (the test is then
conditional on those runs; the hierarchical interval in eval.json carries the run-to-run spread). Holm's
step-down procedure controls the family-wise error over the adapters of one table.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

from ..data.bpb import bpb

DEFAULT_MARGIN = 0.001  # bits per byte


def doc_terms(nats_a: np.ndarray, nats_b: np.ndarray, doc_bytes: np.ndarray) -> np.ndarray:
    """Per-document terms whose mean is bpb(A) - bpb(B); (R, D) inputs are averaged over runs first."""
    diff = np.asarray(nats_a, dtype=np.float64) - np.asarray(nats_b, dtype=np.float64)
    if diff.ndim == 2:
        diff = diff.mean(0)
    b = np.asarray(doc_bytes, dtype=np.float64)
    return bpb(diff.size * diff, b.sum())


def tost(z: np.ndarray, margin: float) -> dict[str, float]:
    """Two one-sided t-tests of mean(z) within (-margin, +margin); p = the larger one-sided p-value."""
    if margin <= 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    z = np.asarray(z, dtype=np.float64)
    if z.size < 2 or not np.all(np.isfinite(z)):
        return {"estimate": float(np.mean(z)) if z.size else float("nan"), "p_lower": float("nan"),
                "p_upper": float("nan"), "p": float("nan")}
    if np.ptp(z) <= 1e-12 * max(float(np.abs(z).max()), margin):  # no spread (e.g. an adapter that never
        inside = -margin < float(z.mean()) < margin  # stepped): t is undefined; decide by the value itself
        p_lo = p_hi = 0.0 if inside else 1.0
    else:
        p_lo = float(stats.ttest_1samp(z, -margin, alternative="greater").pvalue)
        p_hi = float(stats.ttest_1samp(z, margin, alternative="less").pvalue)
    return {"estimate": float(z.mean()), "p_lower": p_lo, "p_upper": p_hi, "p": max(p_lo, p_hi)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN and does not count."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = ok.size
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def equivalence_table(doc_nats: Mapping[str, np.ndarray], doc_bytes: np.ndarray,
                      pairs: Mapping[str, tuple[str, str]], margin: float = DEFAULT_MARGIN,
                      alpha: float = 0.05) -> dict[str, object]:
    """TOST for each named pair (key -> (A, B)), Holm-corrected over the pairs given (one table's adapters)."""
    rows: dict[str, dict[str, Any]] = {k: tost(doc_terms(doc_nats[a], doc_nats[b], doc_bytes), margin)
                                       for k, (a, b) in pairs.items()}
    adj = holm([r["p"] for r in rows.values()])
    for (k, r), pa in zip(rows.items(), adj):
        r.update({"from": pairs[k][0], "to": pairs[k][1], "p_holm": pa,
                  "equivalent": bool(np.isfinite(pa) and pa < alpha)})
    return {"margin_bpb": margin, "alpha": alpha, "correction": "holm", "test": "TOST, one-sample t on per-document "
            "terms (scipy.stats.ttest_1samp)", "rows": rows}
