"""Small-sample statistics for comparing runs across seeds: t-intervals and paired t-tests (scipy.stats).

Why Student t: ablations have 1–5 seeds, so normal approximations (and bootstrap) are wrong at that size.
This module is only glue: it keeps n = 1 and zero-variance inputs answerable (scipy returns nan there) and
returns small frozen records. Bootstrap CIs over *tokens/documents* within one run are metattt.eval's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds with a two-sided t confidence interval; ``half_width`` is None when n == 1."""

    n: int
    mean: float
    sd: float | None
    half_width: float | None
    level: float

    @property
    def lo(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def hi(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def mean_ci(values: Sequence[float], level: float = 0.95) -> MeanCI:
    vals = np.asarray([float(v) for v in values], dtype=np.float64)
    if vals.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"mean_ci got non-finite values {vals.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1) (got {level})")
    n, mean = int(vals.size), math.fsum(vals) / vals.size
    if n < 2:
        return MeanCI(n=n, mean=mean, sd=None, half_width=None, level=level)
    sd = float(np.std(vals, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return MeanCI(n=n, mean=mean, sd=sd, half_width=half, level=level)


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of ``a - b`` over matched pairs (e.g. seeds). p/t/half_width None when n < 2."""

    n: int
    mean_diff: float
    sd_diff: float | None
    half_width: float | None
    t: float | None
    df: int | None
    p_value: float | None
    level: float


def paired_ttest(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """Two-sided paired t-test of mean(a - b) = 0 (``scipy.stats.ttest_rel``).

    All-equal differences (sd 0) give t = ±inf and p = 0 when the mean difference is non-zero, and
    t = 0, p = 1 when it is zero: the degenerate but honest answer (scipy says nan).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_ttest needs equal lengths (got {len(a)} and {len(b)})")
    if not len(a):
        raise ValueError("paired_ttest needs at least one pair")
    ci = mean_ci([float(x) - float(y) for x, y in zip(a, b)], level)
    if ci.sd is None:
        return PairedTest(ci.n, ci.mean, None, None, None, None, None, level)
    if ci.sd == 0.0:
        t, p = (0.0, 1.0) if ci.mean == 0.0 else (math.copysign(math.inf, ci.mean), 0.0)
    else:
        res = stats.ttest_rel(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        t, p = float(res.statistic), float(res.pvalue)
    return PairedTest(ci.n, ci.mean, ci.sd, ci.half_width, t, ci.n - 1, p, level)
