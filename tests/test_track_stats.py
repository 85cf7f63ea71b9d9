"""The scipy glue of metattt.track.stats against textbook tables and closed forms of Student t."""

from __future__ import annotations

import math

import pytest

from metattt.track.stats import mean_ci, paired_ttest

# Two-sided 95% critical values t_{0.975, df} from standard tables (3 decimals).
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}
# One-sided 0.95 values = two-sided 90%.
TABLE_95 = {1: 6.314, 3: 2.353, 7: 1.895, 20: 1.725}


def _unit_sd_sample(n: int) -> list[float]:
    """n values with mean 0 and sample sd exactly 1 (so half_width = t_q * 1 / sqrt(n))."""
    raw = [float(i) for i in range(n)]
    m = sum(raw) / n
    s = math.sqrt(sum((x - m) ** 2 for x in raw) / (n - 1))
    return [(x - m) / s for x in raw]


@pytest.mark.parametrize("df, t", sorted(TABLE_975.items()))
def test_half_width_uses_t_quantile_975(df: int, t: float) -> None:
    ci = mean_ci(_unit_sd_sample(df + 1))
    assert ci.sd == pytest.approx(1.0, abs=1e-12)
    assert ci.half_width * math.sqrt(df + 1) == pytest.approx(t, abs=6e-4)


@pytest.mark.parametrize("df, t", sorted(TABLE_95.items()))
def test_half_width_uses_t_quantile_90_two_sided(df: int, t: float) -> None:
    ci = mean_ci(_unit_sd_sample(df + 1), level=0.90)
    assert ci.half_width * math.sqrt(df + 1) == pytest.approx(t, abs=6e-4)


@pytest.mark.parametrize("t_target", [0.3, 1.0, 2.5, 12.0, -4.0])
@pytest.mark.parametrize("df", [1, 2, 4])
def test_paired_p_value_closed_forms(df: int, t_target: float) -> None:
    # differences with sample sd 1 shifted to mean t_target/sqrt(n): t statistic = t_target exactly
    n = df + 1
    diffs = [d + t_target / math.sqrt(n) for d in _unit_sd_sample(n)]
    pt = paired_ttest([10.0 + d for d in diffs], [10.0] * n)
    assert pt.t == pytest.approx(t_target, rel=1e-9) and pt.df == df
    a = abs(t_target)
    if df == 1:  # Cauchy
        p = 1 - 2 / math.pi * math.atan(a)
    elif df == 2:
        p = 1 - a / math.sqrt(2 + a * a)
    else:  # df=4: F(t) = 1/2 + (3/4) u (1 - u^2/3) with u = t / sqrt(4 + t^2)
        u = a / math.sqrt(4 + a * a)
        p = 1 - 2 * (0.75 * u * (1 - u * u / 3))
    assert pt.p_value == pytest.approx(p, rel=1e-8)


def test_mean_ci_and_paired() -> None:
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    assert (ci.n, ci.mean, ci.sd) == (4, 2.5, pytest.approx(sd))
    assert ci.half_width == pytest.approx(3.182446305 * sd / 2, rel=1e-8)
    assert (ci.lo, ci.hi) == (pytest.approx(2.5 - ci.half_width), pytest.approx(2.5 + ci.half_width))
    one = mean_ci([7.0])
    assert one.half_width is None and one.lo is None and one.mean == 7.0
    assert paired_ttest([1.0], [0.5]).p_value is None
    pt = paired_ttest([1.0, 1.2, 1.1], [0.9, 1.25, 1.0])
    d = [0.1, -0.05, 0.1]
    m = sum(d) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    tt = m / (s / math.sqrt(3))
    assert pt.t == pytest.approx(tt) and pt.df == 2
    assert pt.p_value == pytest.approx(1 - tt / math.sqrt(2 + tt * tt))
    assert pt.half_width == pytest.approx(4.302652729749464 * s / math.sqrt(3), rel=1e-9)
    const = paired_ttest([2.0, 3.0], [1.0, 2.0])  # every difference is exactly 1
    assert const.t == math.inf and const.p_value == 0.0
    same = paired_ttest([2.0, 3.0], [2.0, 3.0])
    assert same.t == 0.0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ttest([1.0, 2.0], [1.0])
