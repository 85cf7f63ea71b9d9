"""Small-sample statistics for comparing runs across seeds: t-intervals and paired t-tests.

Why here and dependency-free: ablations have 1–5 seeds, so normal approximations (and bootstrap) are
wrong at that size; the Student t distribution is exact under the usual assumptions and needs only the
regularized incomplete beta function, implemented below (scipy is not a project dependency).
Bootstrap CIs over *tokens/documents* within one run are the evaluator's business (metattt/eval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1 (got {x})")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _check_df(df: float) -> None:
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0 (got {df})")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    _check_df(df)
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (closed forms for df 1 and 2, else bisection on the CDF to ~1e-12)."""
    _check_df(df)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1) (got {q})")
    if q == 0.5:
        return 0.0
    if df == 1:
        return math.tan(math.pi * (q - 0.5))
    if df == 2:
        return (2.0 * q - 1.0) / math.sqrt(2.0 * q * (1.0 - q))
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


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
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_ci got non-finite values {vals}")
    mean, sd = _mean_sd(vals)
    n = len(vals)
    half = None if sd is None else t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
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
    """Two-sided paired t-test of mean(a - b) = 0.

    All-equal differences (sd 0) give t = ±inf and p = 0 when the mean difference is non-zero, and
    t = 0, p = 1 when it is zero: the degenerate but honest answer.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_ttest needs equal lengths (got {len(a)} and {len(b)})")
    if not a:
        raise ValueError("paired_ttest needs at least one pair")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    ci = mean_ci(diffs, level)
    if ci.n < 2 or ci.sd is None:
        return PairedTest(ci.n, ci.mean, None, None, None, None, None, level)
    df = ci.n - 1
    se = ci.sd / math.sqrt(ci.n)
    if se == 0.0:
        t = 0.0 if ci.mean == 0.0 else math.copysign(math.inf, ci.mean)
    else:
        t = ci.mean / se
    return PairedTest(ci.n, ci.mean, ci.sd, ci.half_width, t, df, t_two_sided_p(t, df), level)
