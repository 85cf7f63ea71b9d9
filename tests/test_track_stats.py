"""Student-t machinery against textbook tables and closed forms (no scipy)."""

from __future__ import annotations

import math

import pytest

from metattt.track.stats import betainc, mean_ci, paired_ttest, t_cdf, t_ppf, t_two_sided_p

# Two-sided 95% critical values t_{0.975, df} from standard tables (3 decimals).
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 120: 1.980}
# One-sided 0.95 values.
TABLE_95 = {1: 6.314, 3: 2.353, 7: 1.895, 20: 1.725}


@pytest.mark.parametrize("df, t", sorted(TABLE_975.items()))
def test_t_ppf_matches_table_975(df: int, t: float) -> None:
    assert t_ppf(0.975, df) == pytest.approx(t, abs=6e-4)
    assert t_ppf(0.025, df) == pytest.approx(-t, abs=6e-4)


@pytest.mark.parametrize("df, t", sorted(TABLE_95.items()))
def test_t_ppf_matches_table_95(df: int, t: float) -> None:
    assert t_ppf(0.95, df) == pytest.approx(t, abs=6e-4)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0, -4.0])
def test_two_sided_p_closed_forms(t: float) -> None:
    # df=1 (Cauchy): p = 1 - 2/pi * atan|t|;  df=2: p = 1 - |t| / sqrt(2 + t^2);  df=4 below.
    a = abs(t)
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(a), abs=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - a / math.sqrt(2 + a * a), abs=1e-12)
    u = a / math.sqrt(4 + a * a)  # df=4: F(t) = 1/2 + (3/4) u (1 - u^2/3) with u = t / sqrt(4 + t^2)
    assert t_two_sided_p(t, 4) == pytest.approx(1 - 2 * (0.75 * u * (1 - u * u / 3)), abs=1e-12)


def test_cdf_ppf_inverse_and_betainc_symmetry() -> None:
    for df in (3, 7.5, 50):
        for q in (0.01, 0.3, 0.5, 0.9, 0.999):
            assert t_cdf(t_ppf(q, df), df) == pytest.approx(q, abs=1e-10)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(1 - betainc(3.0, 2.0, 0.6), abs=1e-14)
    # I_x(1, b) = 1 - (1-x)^b
    assert betainc(1.0, 3.5, 0.2) == pytest.approx(1 - 0.8**3.5, abs=1e-14)
    with pytest.raises(ValueError):
        t_ppf(1.0, 3)
    with pytest.raises(ValueError):
        t_cdf(0.0, 0)


def test_mean_ci_and_paired() -> None:
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    assert (ci.n, ci.mean, ci.sd) == (4, 2.5, pytest.approx(sd))
    assert ci.half_width == pytest.approx(3.182446305 * sd / 2, rel=1e-8)
    one = mean_ci([7.0])
    assert one.half_width is None and one.lo is None and one.mean == 7.0
    pt = paired_ttest([1.0, 1.2, 1.1], [0.9, 1.25, 1.0])
    d = [0.1, -0.05, 0.1]
    m = sum(d) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    tt = m / (s / math.sqrt(3))
    assert pt.t == pytest.approx(tt) and pt.df == 2
    assert pt.p_value == pytest.approx(1 - tt / math.sqrt(2 + tt * tt))
    const = paired_ttest([2.0, 3.0], [1.0, 2.0])  # every difference is exactly 1
    assert const.t == math.inf and const.p_value == 0.0
    same = paired_ttest([2.0, 3.0], [2.0, 3.0])
    assert same.t == 0.0 and same.p_value == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
