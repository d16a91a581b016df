"""Statistics for the comparison report: bootstrap intervals and the budget sweep.

Everything here is plain NumPy on small arrays (one value per seed), so the
report is reproducible bit for bit: every bootstrap draws from a fixed seed.

Budget sweep ("fewer epochs"): each method is trained with its learning-rate
schedule scaled to a fraction ``b`` of the baseline's epoch budget. The
*epoch saving* of a method is ``1 - b*``, where ``b*`` is the smallest budget at
which the method's mean final test accuracy (over seeds) reaches the
baseline's mean accuracy at the full budget. When no budget reaches it the
saving is undefined (reported as ``None``: "does not reach the baseline").
Its 95% interval comes from a bootstrap over seeds: the seeds of every
(method, budget) cell and of the baseline's full-budget cell are resampled
with replacement, ``b*`` is recomputed each time, and the 2.5/97.5 percentiles
of the resulting savings are reported (a resample that reaches at no budget
counts as the lowest possible value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "bootstrap_diff_ci",
    "bootstrap_mean_ci",
    "epoch_saving",
    "epoch_saving_ci",
]

_NOT_REACHED = -np.inf


def _as_values(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{what}: expected a non-empty 1-D sequence of values, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: values must be finite, got {arr.tolist()}")
    return arr


def bootstrap_mean_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval.

    Returns ``(mean, low, high)``. With a single value the interval collapses
    to that value (nothing to resample), which the report marks with n = 1.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arr = _as_values(values, "values")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def bootstrap_diff_ci(
    values: Sequence[float],
    reference: Sequence[float],
    *,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Difference of means ``mean(values) - mean(reference)`` and its bootstrap interval.

    The two groups are resampled independently (seeds of two methods are
    separate runs), so the interval also holds when the groups differ in size.
    Returns ``(difference, low, high)``; with one value in both groups the
    interval collapses to the difference.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = _as_values(values, "values")
    b = _as_values(reference, "reference")
    diff = float(a.mean() - b.mean())
    if a.size == 1 and b.size == 1:
        return diff, diff, diff
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    db = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(da - db, [alpha, 1.0 - alpha])
    return diff, float(low), float(high)


def _smallest_reaching_budget(means: Mapping[float, float], target: float) -> float | None:
    for budget in sorted(means):
        if means[budget] >= target:
            return budget
    return None


def epoch_saving(
    method: Mapping[float, Sequence[float]],
    baseline_full: Sequence[float],
    *,
    full_budget: float = 1.0,
) -> float | None:
    """Epoch saving ``1 - b*`` of a method (``None`` when no budget reaches).

    Args:
      method: budget fraction -> final test accuracies of the method's seeds.
      baseline_full: the baseline's final test accuracies at ``full_budget``.
      full_budget: the budget that defines 100%.
    """
    if not method:
        raise ValueError("method: no budgets given")
    target = float(_as_values(baseline_full, "baseline_full").mean())
    means = {float(b): float(_as_values(v, f"budget {b}").mean()) for b, v in method.items()}
    b_star = _smallest_reaching_budget(means, target)
    return None if b_star is None else full_budget - b_star


def epoch_saving_ci(
    method: Mapping[float, Sequence[float]],
    baseline_full: Sequence[float],
    *,
    full_budget: float = 1.0,
    level: float = 0.95,
    n_boot: int = 2_000,
    seed: int = 0,
) -> tuple[float | None, float | None, float | None, float]:
    """Epoch saving with its bootstrap interval over seeds.

    Returns ``(saving, low, high, p_reached)``: the point estimate, the interval
    bounds (``None`` where that percentile falls on "not reached") and the
    fraction of bootstrap resamples in which some budget reached the target.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    point = epoch_saving(method, baseline_full, full_budget=full_budget)
    base = _as_values(baseline_full, "baseline_full")
    cells = {float(b): _as_values(v, f"budget {b}") for b, v in method.items()}
    rng = np.random.default_rng(seed)
    savings = np.empty(n_boot)
    for i in range(n_boot):
        target = base[rng.integers(0, base.size, base.size)].mean()
        means = {b: v[rng.integers(0, v.size, v.size)].mean() for b, v in cells.items()}
        b_star = _smallest_reaching_budget(means, target)
        savings[i] = _NOT_REACHED if b_star is None else full_budget - b_star
    alpha = (1.0 - level) / 2.0
    # "lower" interpolation keeps the percentiles on observed savings (a finite
    # set of budgets), so "not reached" never mixes into a number.
    low, high = np.quantile(savings, [alpha, 1.0 - alpha], method="lower")

    def _finite(x: float) -> float | None:
        return None if not np.isfinite(x) else float(x)

    return point, _finite(low), _finite(high), float(np.mean(np.isfinite(savings)))
