"""Statistics for the comparison report: paired seeds, Student-t intervals, Holm, budgets.

Everything here is plain NumPy/SciPy on small arrays (one value per seed), so
the report is reproducible bit for bit: every bootstrap draws from a fixed seed.

**Pairing.** In a suite, seed ``s`` means the same initialisation and the same
data order for every method, so a method is compared with the baseline seed by
seed: the differences ``d_s = acc(method, s) - acc(baseline, s)`` over the seeds
both ran (a method run on seeds 0-2 is compared with baseline seeds 0-2 only).
The primary interval is Student's t on the paired differences,
``mean(d) ± t_{n-1, 0.975} · sd(d) / √n``, with the paired t-test's two-sided
p-value; a percentile bootstrap of ``mean(d)`` is a cross-check (it
under-covers at n = 3-5, which is why it is not primary). Across the methods
of a suite the verdicts are Holm-corrected (family-wise error ``alpha``).

**Budget sweep.** Methods are trained with their schedules scaled to fractions
``b`` of the baseline's budget. A curve of mean accuracy against budget is made
monotone (non-decreasing, by least-squares isotonic regression) and read as a
piecewise-linear function between the budgets that were run.

- *Epoch saving* (primary): ``1 - b*/B`` where ``b*`` is where the method's
  curve reaches the baseline's mean accuracy at the full budget ``B``.
  Censored below at the smallest budget run (reported as ``≥``), ``None`` when
  the method never reaches it.
- *Equivalent budget*: where the **baseline's** curve reaches the method's
  full-budget accuracy, as a fraction of ``B`` (what fraction of the baseline's
  training the method's full run is worth). Censored at both ends of the grid
  (``≤`` smallest, ``≥`` full budget).
- *Grid saving* (the coarse reading, kept as a check): ``1 - b`` for the
  smallest budget ``b`` run whose mean reaches the target; it can only take
  the values of the grid.

Their 95% intervals come from a paired bootstrap: the seeds common to all the
cells involved are resampled with replacement, the same draw for the method
and the baseline, and the statistic recomputed; the percentiles are read on the
censored values ("lower" interpolation, so a bound is always an observed value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _sps

__all__ = [
    "BudgetReading",
    "PairedComparison",
    "SweepResult",
    "bootstrap_mean_ci",
    "budget_sweep",
    "epoch_saving",
    "equivalent_budget",
    "grid_saving",
    "holm",
    "monotone",
    "paired",
    "reach_budget",
    "t_mean_ci",
]

# A censored or missing reading: "never reached" sorts below every budget.
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


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def bootstrap_mean_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap interval ``(mean, low, high)``.

    With a single value the interval collapses to that value (nothing to resample).
    """
    _check_level(level)
    arr = _as_values(values, "values")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def t_mean_ci(values: Sequence[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval ``mean ± t_{n-1} · sd / √n`` as ``(mean, low, high)``.

    ``n = 1`` gives an unbounded interval ``(mean, -inf, inf)``: one seed says nothing
    about the spread.
    """
    _check_level(level)
    arr = _as_values(values, "values")
    mean = float(arr.mean())
    if arr.size == 1:
        return mean, -np.inf, np.inf
    half = _sps.t.ppf(0.5 + level / 2.0, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return mean, float(mean - half), float(mean + half)


@dataclass(frozen=True)
class PairedComparison:
    """A method against a reference on the seeds both ran."""

    seeds: tuple[int, ...]  # the matched seeds, sorted
    diffs: tuple[float, ...]  # method - reference, per matched seed
    mean: float  # mean paired difference
    t_low: float  # Student-t interval of the mean difference (primary)
    t_high: float
    p_value: float  # two-sided paired t-test (nan with one seed)
    boot_low: float  # percentile bootstrap of the mean difference (cross-check)
    boot_high: float

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired(
    values: Mapping[int, float],
    reference: Mapping[int, float],
    *,
    level: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Seed-matched comparison of ``values`` (seed -> metric) with ``reference``.

    Only seeds present in both are used. Raises ``ValueError`` when none match.
    """
    _check_level(level)
    seeds = tuple(sorted(set(values) & set(reference)))
    if not seeds:
        raise ValueError(
            f"no seed in common: values have seeds {sorted(values)}, "
            f"reference has {sorted(reference)}"
        )
    d = _as_values([values[s] - reference[s] for s in seeds], "paired differences")
    mean, t_low, t_high = t_mean_ci(d, level=level)
    _, b_low, b_high = bootstrap_mean_ci(d, level=level, n_boot=n_boot, seed=seed)
    if d.size < 2:
        p = float("nan")
    else:
        sd = d.std(ddof=1)
        if sd == 0.0:
            p = 1.0 if mean == 0.0 else 0.0
        else:
            t = mean / (sd / np.sqrt(d.size))
            p = float(2.0 * _sps.t.sf(abs(t), d.size - 1))
    return PairedComparison(
        seeds=seeds,
        diffs=tuple(float(x) for x in d),
        mean=mean,
        t_low=t_low,
        t_high=t_high,
        p_value=p,
        boot_low=b_low,
        boot_high=b_high,
    )


def holm(p_values: Mapping[str, float], *, alpha: float = 0.05) -> dict[str, bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise ``alpha``.

    The ``k``-th smallest of ``m`` p-values is compared with ``alpha / (m - k)``
    (``k`` from 0); rejection stops at the first that fails. ``nan`` p-values are
    never rejected and do not count towards ``m``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    valid = {k: p for k, p in p_values.items() if not np.isnan(p)}
    out = dict.fromkeys(p_values, False)
    m = len(valid)
    for k, (name, p) in enumerate(sorted(valid.items(), key=lambda kv: kv[1])):
        if p > alpha / (m - k):
            break
        out[name] = True
    return out


def monotone(values: Sequence[float]) -> np.ndarray:
    """Least-squares non-decreasing fit of ``values`` (pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in _as_values(values, "values"):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def reach_budget(
    budgets: Sequence[float], accs: Sequence[float], target: float
) -> tuple[float | None, str]:
    """Where the monotone piecewise-linear curve through ``(budgets, accs)`` reaches ``target``.

    Returns ``(budget, censor)``: ``censor`` is ``""`` for an interpolated value,
    ``"≤"`` when the curve is already at the target at the smallest budget (the
    budget returned is that smallest one) and ``"not reached"`` (budget ``None``)
    when it never gets there.
    """
    b = _as_values(budgets, "budgets")
    if np.any(np.diff(b) <= 0):
        raise ValueError(f"budgets must be strictly increasing, got {b.tolist()}")
    y = monotone(accs)
    if y.size != b.size:
        raise ValueError(f"{b.size} budgets but {y.size} accuracies")
    if y[0] >= target:
        return float(b[0]), "≤"
    if y[-1] < target:
        return None, "not reached"
    j = int(np.argmax(y >= target))  # first budget at or above the target; y[j-1] < target
    frac = (target - y[j - 1]) / (y[j] - y[j - 1])
    return float(b[j - 1] + frac * (b[j] - b[j - 1])), ""


def _means(cells: Mapping[float, np.ndarray], budgets: Sequence[float], idx=None) -> np.ndarray:
    return np.array([cells[b].mean() if idx is None else cells[b][idx].mean() for b in budgets])


def epoch_saving(
    method: Mapping[float, np.ndarray], target: float, *, full: float
) -> tuple[float | None, str]:
    """Interpolated epoch saving ``1 - b*/full`` (``censor`` ``"≥"`` at the grid's end)."""
    budgets = sorted(method)
    b_star, censor = reach_budget(budgets, _means(method, budgets), target)
    if b_star is None:
        return None, "not reached"
    return 1.0 - b_star / full, "≥" if censor == "≤" else ""


def equivalent_budget(
    baseline: Mapping[float, np.ndarray], acc: float, *, full: float
) -> tuple[float, str]:
    """Fraction of the baseline's full budget at which its curve reaches ``acc``.

    ``censor``: ``"≥"`` when ``acc`` is at or above the baseline's full-budget
    accuracy (returned as 1.0), ``"≤"`` when at or below its smallest budget's.
    """
    budgets = sorted(b for b in baseline if b <= full)
    y = monotone(_means(baseline, budgets))
    if acc >= y[-1]:
        return 1.0, "≥"
    b_eq, censor = reach_budget(budgets, y, acc)
    return float(b_eq) / full, censor


def grid_saving(method: Mapping[float, np.ndarray], target: float, *, full: float) -> float | None:
    """The coarse reading: ``1 - b/full`` for the smallest budget run whose mean reaches."""
    for b in sorted(method):
        if method[b].mean() >= target:
            return 1.0 - b / full
    return None


@dataclass(frozen=True)
class BudgetReading:
    """One budget statistic with its paired-bootstrap interval (``None`` = not reached)."""

    value: float | None
    censor: str  # "", "≥", "≤" or "not reached"
    low: float | None
    high: float | None


@dataclass(frozen=True)
class SweepResult:
    seeds: tuple[int, ...]  # seeds present in every cell used
    saving: BudgetReading  # interpolated epoch saving (primary)
    equivalent: BudgetReading  # equivalent budget of the method's full-budget accuracy
    grid: BudgetReading  # the coarse grid reading
    p_reach: float  # fraction of bootstrap draws in which the method reaches the target


def _interval(draws: np.ndarray, level: float) -> tuple[float | None, float | None]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha], method="lower")
    return (None if not np.isfinite(low) else float(low)), (
        None if not np.isfinite(high) else float(high)
    )


def budget_sweep(
    method: Mapping[float, Mapping[int, float]],
    baseline: Mapping[float, Mapping[int, float]],
    *,
    full: float,
    level: float = 0.95,
    n_boot: int = 2_000,
    seed: int = 0,
) -> SweepResult:
    """Epoch saving, equivalent budget and grid saving of ``method`` with paired intervals.

    Args:
      method: budget -> (seed -> final accuracy) of the method.
      baseline: the same for the baseline; it must include ``full``.
      full: the budget that defines 100%.

    Only the seeds present in every cell of both are used (seed-matched).
    """
    _check_level(level)
    if full not in baseline or full not in method:
        raise ValueError(f"both the method and the baseline need runs at the full budget {full}")
    cells_used = [*method.values(), *baseline.values()]
    seeds = tuple(sorted(set.intersection(*(set(c) for c in cells_used))))
    if not seeds:
        raise ValueError("no seed is common to every budget of the method and the baseline")
    m = {b: np.array([c[s] for s in seeds], dtype=np.float64) for b, c in method.items()}
    base = {b: np.array([c[s] for s in seeds], dtype=np.float64) for b, c in baseline.items()}

    def _stats(idx=None):
        pick = (lambda a: a) if idx is None else (lambda a: a[idx])
        mm = {b: pick(v) for b, v in m.items()}
        bb = {b: pick(v) for b, v in base.items()}
        target = bb[full].mean()
        sav, sav_c = epoch_saving(mm, target, full=full)
        eq, eq_c = equivalent_budget(bb, mm[full].mean(), full=full)
        grid = grid_saving(mm, target, full=full)
        return (sav, sav_c), (eq, eq_c), grid

    (sav, sav_c), (eq, eq_c), grid = _stats()
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, 3))
    for i in range(n_boot):
        idx = rng.integers(0, len(seeds), len(seeds))
        (s_i, _), (e_i, _), g_i = _stats(idx)
        draws[i] = (
            _NOT_REACHED if s_i is None else s_i,
            e_i,
            _NOT_REACHED if g_i is None else g_i,
        )
    return SweepResult(
        seeds=seeds,
        saving=BudgetReading(sav, sav_c, *_interval(draws[:, 0], level)),
        equivalent=BudgetReading(eq, eq_c, *_interval(draws[:, 1], level)),
        grid=BudgetReading(
            grid, "" if grid is not None else "not reached", *_interval(draws[:, 2], level)
        ),
        p_reach=float(np.mean(np.isfinite(draws[:, 0]))),
    )
