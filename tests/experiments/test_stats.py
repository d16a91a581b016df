"""Tests of the comparison report's statistics (plain NumPy, no JAX)."""

import numpy as np
import pytest

from experiments.stats import bootstrap_mean_ci, epoch_saving, epoch_saving_ci


def test_bootstrap_mean_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(0.9, 0.01, size=5)
    large = rng.normal(0.9, 0.01, size=200)
    m, lo, hi = bootstrap_mean_ci(small)
    assert lo <= m <= hi
    assert m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_mean_ci(large)
    assert hi2 - lo2 < hi - lo
    # The 95% interval of the mean of N(0.9, 0.01) with n=200 holds 0.9.
    assert lo2 < 0.9 < hi2


def test_bootstrap_single_value_and_bad_input():
    assert bootstrap_mean_ci([0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([0.1, 0.2], level=1.5)


def test_epoch_saving_picks_smallest_reaching_budget():
    base = [0.90, 0.91, 0.89]  # mean 0.90
    method = {0.5: [0.85, 0.86], 0.6: [0.90, 0.905], 0.8: [0.91, 0.92], 1.0: [0.92, 0.93]}
    assert epoch_saving(method, base) == pytest.approx(0.4)
    # The baseline against itself saves nothing.
    assert epoch_saving({0.5: [0.8], 1.0: base}, base) == pytest.approx(0.0)
    # A method that never reaches the target has no saving.
    assert epoch_saving({0.5: [0.5], 1.0: [0.6]}, base) is None


def test_epoch_saving_ci_brackets_point_and_reports_reach_rate():
    rng = np.random.default_rng(0)
    base = rng.normal(0.90, 0.005, size=5)
    clear = {b: rng.normal(0.95, 0.005, size=5) for b in (0.5, 0.6, 0.8, 1.0)}
    point, lo, hi, p = epoch_saving_ci(clear, base)
    assert point == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert p == 1.0
    never = {b: rng.normal(0.80, 0.005, size=5) for b in (0.5, 1.0)}
    point, lo, hi, p = epoch_saving_ci(never, base)
    assert point is None and lo is None and hi is None and p == 0.0
    # A noisy method near the target: the interval spans several budgets.
    noisy = {b: rng.normal(0.90, 0.02, size=5) for b in (0.5, 0.6, 0.8, 1.0)}
    _, lo, hi, p = epoch_saving_ci(noisy, base)
    assert 0.0 < p <= 1.0
    assert hi is not None and (lo is None or lo <= hi)


def test_bootstrap_diff_ci_brackets_the_difference_and_detects_a_shift():
    from experiments.stats import bootstrap_diff_ci

    rng = np.random.default_rng(1)
    base = rng.normal(0.80, 0.01, size=5)
    shifted = rng.normal(0.85, 0.01, size=5)
    diff, lo, hi = bootstrap_diff_ci(shifted, base)
    assert lo <= diff <= hi
    assert lo > 0.0  # a 5-sigma shift is detected
    same = rng.normal(0.80, 0.01, size=5)
    _, lo2, hi2 = bootstrap_diff_ci(same, base)
    assert lo2 < 0.0 < hi2 or abs(np.mean(same) - np.mean(base)) > 0.01
    assert bootstrap_diff_ci([0.5], [0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="reference"):
        bootstrap_diff_ci([0.5], [])
