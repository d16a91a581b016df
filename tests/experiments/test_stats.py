"""The report's statistics against hand-computed cases (plain NumPy/SciPy, no JAX)."""

import math

import numpy as np
import pytest

from experiments.suites.stats import (
    bootstrap_mean_ci,
    budget_sweep,
    epoch_saving,
    equivalent_budget,
    grid_saving,
    holm,
    monotone,
    paired,
    reach_budget,
    t_mean_ci,
)


def test_t_interval_by_hand():
    # mean 2, sd 1, n 3: half width = t_{2, 0.975} / sqrt(3) = 4.302653 / 1.732051
    mean, lo, hi = t_mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - 2.484138, abs=1e-6)
    assert hi == pytest.approx(2.0 + 2.484138, abs=1e-6)
    assert t_mean_ci([0.5]) == (0.5, -math.inf, math.inf)
    with pytest.raises(ValueError, match="finite"):
        t_mean_ci([0.1, float("nan")])


def test_paired_difference_by_hand():
    values = {0: 0.80, 1: 0.70, 2: 0.90}
    ref = {0: 0.78, 1: 0.67, 2: 0.89}
    r = paired(values, ref)
    assert r.seeds == (0, 1, 2)
    assert r.diffs == pytest.approx((0.02, 0.03, 0.01))
    assert r.mean == pytest.approx(0.02)
    # sd(d) = 0.01, se = 0.01/sqrt(3), t_{2,0.975} = 4.302653 -> half width 0.0248414
    assert r.t_low == pytest.approx(0.02 - 0.0248414, abs=1e-6)
    assert r.t_high == pytest.approx(0.02 + 0.0248414, abs=1e-6)
    # t = 0.02 / (0.01/sqrt(3)) = sqrt(12); with 2 df, P(T > t) = (1 - t/sqrt(t^2 + 2)) / 2
    t = math.sqrt(12.0)
    assert r.p_value == pytest.approx(1.0 - t / math.sqrt(t * t + 2.0), rel=1e-6)
    assert r.boot_low <= r.mean <= r.boot_high


def test_pairing_matters():
    # Seeds differ a lot from each other, but the method is ahead by ~2 pp on every seed.
    ref = {0: 0.60, 1: 0.80, 2: 0.70, 3: 0.90}
    values = {s: a + 0.02 + 0.001 * (-1) ** s for s, a in ref.items()}
    r = paired(values, ref)
    assert r.t_low > 0.0 and r.p_value < 0.001
    # The unpaired view (group means with their own intervals) cannot separate them.
    _, lo_v, hi_v = t_mean_ci(list(values.values()))
    _, lo_r, hi_r = t_mean_ci(list(ref.values()))
    assert lo_v < hi_r and lo_r < hi_v


def test_paired_uses_matched_seeds_only():
    ref = {0: 0.50, 1: 0.52, 2: 0.51, 3: 0.99, 4: 0.99}  # seeds 3, 4 would bias the unpaired mean
    values = {0: 0.55, 1: 0.57, 2: 0.56}
    r = paired(values, ref)
    assert r.seeds == (0, 1, 2)
    assert r.mean == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no seed in common"):
        paired({7: 0.5}, ref)
    assert math.isnan(paired({0: 0.6}, ref).p_value)


def test_holm_by_hand():
    # m = 3: 0.01 <= 0.05/3 rejected; 0.03 > 0.05/2 stops: b and c kept.
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == {"a": True, "b": False, "c": False}
    # m = 2: 0.01 <= 0.025 and 0.02 <= 0.05: both (Bonferroni would keep b).
    assert holm({"a": 0.01, "b": 0.02}) == {"a": True, "b": True}
    assert holm({"a": 0.2, "b": float("nan")}) == {"a": False, "b": False}
    with pytest.raises(ValueError, match="alpha"):
        holm({"a": 0.1}, alpha=0.0)


def test_monotone_and_reach_budget():
    assert monotone([1.0, 3.0, 2.0, 4.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert monotone([3.0, 2.0, 1.0]).tolist() == [2.0, 2.0, 2.0]
    budgets, accs = [0.5, 0.6, 0.8, 1.0], [0.60, 0.70, 0.80, 0.90]
    assert reach_budget(budgets, accs, 0.75) == (pytest.approx(0.7), "")
    assert reach_budget(budgets, accs, 0.55) == (0.5, "≤")
    assert reach_budget(budgets, accs, 0.95) == (None, "not reached")
    # A dip is pooled before inverting: [0.6, 0.8, 0.7, 0.9] -> [0.6, 0.75, 0.75, 0.9].
    assert reach_budget(budgets, [0.6, 0.8, 0.7, 0.9], 0.75)[0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="increasing"):
        reach_budget([1.0, 0.5], [0.1, 0.2], 0.1)


def test_interpolated_saving_is_finer_than_the_grid():
    method = {b: np.array([a]) for b, a in zip((0.5, 0.6, 0.8, 1.0), (0.6, 0.7, 0.8, 0.9))}
    saving, censor = epoch_saving(method, 0.75, full=1.0)
    assert saving == pytest.approx(0.3) and censor == ""
    assert grid_saving(method, 0.75, full=1.0) == pytest.approx(0.2)  # the grid can only say 20%
    assert epoch_saving(method, 0.5, full=1.0) == (0.5, "≥")
    assert epoch_saving(method, 0.95, full=1.0) == (None, "not reached")
    # The baseline's curve read the other way: 0.85 is worth 90% of the baseline's budget.
    assert equivalent_budget(method, 0.85, full=1.0) == (pytest.approx(0.9), "")
    assert equivalent_budget(method, 0.95, full=1.0) == (1.0, "≥")
    assert equivalent_budget(method, 0.55, full=1.0) == (0.5, "≤")


def _cells(fn, seeds, budgets=(0.5, 0.6, 0.8, 1.0)):
    return {b: {s: fn(b, s) for s in seeds} for b in budgets}


def test_budget_sweep_pairs_seeds():
    # Seed offsets are large (0.05 per seed) but shared by method and baseline, so the
    # paired bootstrap is exact: the method is 0.04 ahead everywhere, its curve
    # 0.54 + 0.4 b reaches the baseline's 0.9 (+ offset) at b = 0.9: saving 10%.
    base = _cells(lambda b, s: 0.5 + 0.4 * b + 0.05 * s, range(5))
    meth = _cells(lambda b, s: 0.54 + 0.4 * b + 0.05 * s, range(5))
    r = budget_sweep(meth, base, full=1.0)
    assert r.seeds == (0, 1, 2, 3, 4)
    assert r.saving.value == pytest.approx(0.1)
    assert r.saving.low == pytest.approx(0.1) and r.saving.high == pytest.approx(0.1)
    assert r.equivalent.value == 1.0 and r.equivalent.censor == "≥"
    assert r.grid.value == pytest.approx(0.0)  # only the full budget reaches on the grid
    assert r.p_reach == 1.0
    # An extra baseline seed with a wild value is not matched, so nothing changes.
    base_extra = {b: {**c, 9: 0.0} for b, c in base.items()}
    assert budget_sweep(meth, base_extra, full=1.0).saving.value == pytest.approx(0.1)


def test_budget_sweep_worse_method_has_an_equivalent_budget():
    base = _cells(lambda b, s: 0.5 + 0.4 * b + 0.01 * s, range(3))
    worse = _cells(lambda b, s: 0.46 + 0.4 * b + 0.01 * s, range(3))
    r = budget_sweep(worse, base, full=1.0)
    assert r.saving.value is None and r.saving.censor == "not reached"
    assert r.saving.low is None and r.saving.high is None and r.p_reach == 0.0
    # its 0.86 (+ offset) is where the baseline is at b = 0.9
    assert r.equivalent.value == pytest.approx(0.9)
    assert r.equivalent.low == pytest.approx(0.9) and r.equivalent.high == pytest.approx(0.9)
    with pytest.raises(ValueError, match="full budget"):
        budget_sweep({0.5: {0: 0.1}}, base, full=1.0)
    with pytest.raises(ValueError, match="no seed"):
        budget_sweep({1.0: {7: 0.1}}, base, full=1.0)


def test_budget_sweep_noise_widens_the_interval():
    # The method matches the baseline's 0.90 on average at the full budget, but seed by
    # seed it is 3 pp above or below: resamples reach or miss the target about equally.
    base = _cells(lambda b, s: 0.5 + 0.4 * b, range(5))
    full_accs = (0.87, 0.93, 0.88, 0.92, 0.90)
    meth = _cells(lambda b, s: full_accs[s] if b == 1.0 else 0.4 + 0.4 * b, range(5))
    r = budget_sweep(meth, base, full=1.0)
    assert r.saving.value == pytest.approx(0.0)
    assert 0.3 < r.p_reach < 0.9
    assert r.saving.low is None  # the lower end is "not reached"
    assert r.saving.high is not None and r.saving.high > 0.0


def test_bootstrap_mean_ci():
    rng = np.random.default_rng(1)
    large = rng.normal(0.9, 0.01, size=200)
    m, lo, hi = bootstrap_mean_ci(large)
    assert lo < 0.9 < hi and m == pytest.approx(large.mean())
    assert bootstrap_mean_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([0.1, 0.2], level=1.5)
