"""The report of a pre-registered long suite (``report = "long"``, e.g. ``cpu-cifar10-long``).

Its runs evaluate the validation split every epoch (``val_acc``) and the test split once
after the last step (the summary's ``final_test_acc``). ``RESULTS.md`` starts with the
pre-registered primary endpoint and its verdict (or what is still missing for it), then:
the pre-registration as written before the runs, the settings, the progress of each phase
of the grid, the sanity checks, the final test accuracies beside the baseline's **on the
same seeds** (Holm across the secondary comparisons), time to result in MLCommons
AlgoPerf's sense (the first evaluated step and wall-clock at which validation accuracy
reaches the baseline@1.0's median final validation accuracy), each method's equivalent
budget against the interpolated baseline curve, the same in wall-clock from the step costs
measured alone (``overhead.json`` of ``experiments.bench.bench_methods``), exploratory
comparisons of GCGD with its parts (labelled as not pre-registered), the methods' own
diagnostics (e.g. GC-ODE's gates) after the first and the last epoch, and the plots.
Everything is rebuilt from the runs' ``metrics.jsonl`` and ``run.json`` (and
``overhead.json``); a suite's hand-written ``DISCUSSION.md`` stays its own page, linked
from the report (the short suites' report copies theirs in instead: a section, not a page).

This module holds the long suite's sections only: the runs, the cells of the grid, the
formatters and the writing of ``RESULTS.md`` are :mod:`experiments.suites.report`'s, shared
with the budget-sweep report. The runner passes the suite in (this module does not import it).

Usage: ``python -m experiments.suites.compare --suite cpu-cifar10-long --report-only``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from experiments.suites.plots import finish, mean_with_band, pyplot
from experiments.suites.report import (
    Run,
    cell,
    clean_step_costs,
    fmt_reading,
    is_complete,
    load_runs,
    pct,
    pp,
    pp_ci,
    run_dir,
    write_results,
)
from experiments.suites.stats import (
    BudgetReading,
    PairedComparison,
    SweepResult,
    budget_sweep,
    holm,
    paired,
    t_mean_ci,
)

__all__ = ["build_long_report", "load_long_runs"]


class SuiteGrid(Protocol):
    """What this report reads of a suite: an ``experiments.suites.compare.Suite``, which the
    runner passes in (this module does not import the runner)."""

    name: str
    preregistration: str
    phases: tuple[Any, ...]  # each with methods, budgets, seeds and cells()

    def grid(self) -> list[tuple[str, float, int]]: ...


# The pre-registered primary comparisons: name -> (method, budget, reference, budget, bar).
# Supported when the lower end of the paired 95% t-interval (pp) is above the bar.
PRIMARY = {
    "(a) GCGD@0.8 − baseline@1.0": ("gcgd", 0.8, "baseline", 1.0, -0.5),
    "(b) GCGD@0.8 − baseline@0.8": ("gcgd", 0.8, "baseline", 0.8, 0.0),
}
SANITY_ACC = 0.70  # baseline@1.0 mean test accuracy at least this
SANITY_GAP_PP = 1.0  # baseline@1.0 − baseline@0.8 at least this (paired)


def load_long_runs(suite_dir: Path) -> list[Run]:
    """The finished runs under ``suite_dir/runs`` with a final test accuracy (the summary's
    ``final_test_acc``); their ``epochs`` are the epoch records with ``val_acc``."""
    runs = []
    for r in load_runs(suite_dir, evaluated="val_acc"):
        if r.summary.get("final_test_acc") is None:
            continue  # no test evaluation after the last step: nothing to report
        if not r.epochs:
            raise ValueError(
                f"{r.folder / 'metrics.jsonl'}: a finished run with no evaluated epoch (no epoch "
                "record with val_acc); the long report reads validation accuracy every epoch"
            )
        runs.append(r)
    return runs


def _compare(runs, a: tuple[str, float], b: tuple[str, float]) -> PairedComparison | None:
    ca, cb = cell(runs, *a), cell(runs, *b)
    if not set(ca) & set(cb):
        return None
    return paired(
        {s: 100 * r.test_acc for s, r in ca.items()}, {s: 100 * r.test_acc for s, r in cb.items()}
    )


def _primary(runs, suite: SuiteGrid) -> tuple[list[str], list[str]]:
    """(verdict lines, table lines) of the pre-registered endpoint."""
    seeds = set(next(p.seeds for p in suite.phases if "gcgd" in p.methods))
    rows, verdicts, complete = [], [], True
    for name, (m, bm, ref, br, bar) in PRIMARY.items():
        c = _compare(runs, (m, bm), (ref, br))
        have = set() if c is None else set(c.seeds)
        if have != seeds:
            complete = False
        if c is None or c.n < 2:
            rows.append(
                f"| {name} | {0 if c is None else c.n} of {len(seeds)} | | | > {bar:+.1f} | pending |"
            )
            continue
        ok = c.t_low > bar
        verdicts.append(ok)
        status = ("supported" if ok else "not supported") + ("" if have == seeds else " (partial)")
        rows.append(
            f"| {name} | {c.n} of {len(seeds)} | {pp_ci(c)} | {c.p_value:.3g} | > {bar:+.1f} | {status} |"
        )
    table = [
        "| comparison (final test accuracy, pp) | paired seeds | mean [95% t-CI] | p | lower end must be | verdict |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if not complete or len(verdicts) < len(PRIMARY):
        done = sum(1 for (m, bm, *_) in PRIMARY.values() for _ in cell(runs, m, bm))
        line = (
            "**Primary endpoint: pending.** Not every report seed of the primary comparisons has "
            f"finished ({done} of {len(PRIMARY) * len(seeds)} GCGD@0.8 seed-comparisons so far); "
            "no verdict is drawn from a partial grid."
        )
        return [line], table
    parts = []
    for (name, (m, bm, ref, br, bar)), ok in zip(PRIMARY.items(), verdicts, strict=True):
        c = _compare(runs, (m, bm), (ref, br))
        parts.append(
            f"{name}: {pp(c.mean)} pp [{pp(c.t_low)}, {pp(c.t_high)}], "
            f"{'supported' if ok else 'not supported'} (bar {bar:+.1f})"
        )
    claim = "holds" if all(verdicts) else "does not hold"
    line = (
        f"**Primary endpoint: the ~20% claim {claim} here** ({len(seeds)} paired seeds, 95% "
        f"Student-t): {'; '.join(parts)}."
    )
    return [line], table


def _sanity(runs) -> list[str]:
    full, short = cell(runs, "baseline", 1.0), cell(runs, "baseline", 0.8)
    lines = ["## Sanity checks (baseline, before GCGD ran)", ""]
    if len(full) < 5 or len(short) < 5:
        return [
            *lines,
            f"Pending: baseline@1.0 {len(full)} of 5 seeds, baseline@0.8 {len(short)} of 5.",
            "",
        ]
    mean, lo, hi = t_mean_ci([r.test_acc for r in full.values()])
    gap = _compare(runs, ("baseline", 1.0), ("baseline", 0.8))
    ok_acc, ok_gap = mean >= SANITY_ACC, gap.mean >= SANITY_GAP_PP
    return [
        *lines,
        (
            f"- baseline@1.0 mean final test accuracy {pct(mean, 2)} [{pct(lo, 2)}, {pct(hi, 2)}] "
            f"(5 seeds): {'passes' if ok_acc else 'FAILS'} the ≥ {100 * SANITY_ACC:.0f}% check."
        ),
        (
            f"- baseline@1.0 − baseline@0.8, paired: {pp_ci(gap)} pp: "
            f"{'passes' if ok_gap else 'FAILS'} the ≥ {SANITY_GAP_PP:g} pp check (the budget matters)."
        ),
        "",
    ]


def _accuracy_table(runs, suite: SuiteGrid) -> tuple[list[str], dict]:
    """Every method × budget beside the baseline's mean on the same seeds; Holm across the
    secondary comparisons (everything but the primary's two)."""
    primary = {(m, bm, ref, br) for m, bm, ref, br, _ in PRIMARY.values()}
    cells = list(dict.fromkeys((m, b) for m, b, _ in suite.grid()))
    comps: dict[str, PairedComparison] = {}
    rows = []
    for m, b in cells:
        cell_runs = cell(runs, m, b)
        if not cell_runs:
            rows.append((m, b, None))
            continue
        refs = [("baseline", b)] + ([("baseline", 1.0)] if b != 1.0 else [])
        if m == "baseline":
            refs = [("baseline", 1.0)] if b != 1.0 else []
        out = []
        for ref in refs:
            c = _compare(runs, (m, b), ref)
            if c is None:
                continue
            key = f"{m}@{b:g} − {ref[0]}@{ref[1]:g}"
            if (m, b, *ref) not in primary and c.n >= 2:
                comps[key] = c
            base = cell(runs, *ref)
            base_mean = np.mean([base[s].test_acc for s in c.seeds])
            out.append((key, ref, c, base_mean))
        rows.append((m, b, out))
    rejected = holm({k: c.p_value for k, c in comps.items()}) if comps else {}
    lines = [
        "## Final test accuracy",
        "",
        (
            "Mean over seeds [95% Student-t]; each difference is paired and seed-matched, beside "
            "the reference's mean **on the same seeds**; p: two-sided paired t-test; Holm: the "
            "secondary comparisons (all but the primary's two) corrected together at family-wise 5%."
        ),
        "",
        "| method | budget | seeds | test accuracy | vs | reference on the same seeds | Δ pp [95% t-CI] | p | Holm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, b, out in rows:
        cell_runs = cell(runs, m, b)
        if out is None:
            lines.append(f"| {m} | {b:g} | 0 | (not run yet) | | | | | |")
            continue
        accs = [r.test_acc for r in cell_runs.values()]
        mean, lo, hi = t_mean_ci(accs)
        acc = f"{pct(mean, 2)} [{pct(lo, 2)}, {pct(hi, 2)}]" if len(accs) > 1 else pct(mean, 2)
        if not out:
            lines.append(f"| {m} | {b:g} | {len(cell_runs)} | {acc} | | | | | |")
        for i, (key, ref, c, base_mean) in enumerate(out):
            if (m, b, *ref) in {(pm, pb, pr, prb) for pm, pb, pr, prb, _ in PRIMARY.values()}:
                verdict = "primary"
            else:
                verdict = "" if key not in comps else ("rejects" if rejected.get(key) else "=")
            lines.append(
                f"| {m if i == 0 else ''} | {b:g} | {len(cell_runs) if i == 0 else ''} "
                f"| {acc if i == 0 else ''} | {ref[0]}@{ref[1]:g} | {pct(base_mean, 2)} (n={c.n}) "
                f"| {pp_ci(c)} | {'' if c.n < 2 else f'{c.p_value:.3g}'} | {verdict} |"
            )
    return [*lines, ""], comps


def _time_to_result(runs, suite: SuiteGrid, costs: dict[str, dict]) -> list[str]:
    full = cell(runs, "baseline", 1.0)
    lines = ["## Time to result (validation, every epoch)", ""]
    if not full:
        return [*lines, "Pending: no finished baseline@1.0 run gives the target yet.", ""]
    target = float(np.median([r.val_acc for r in full.values()]))
    lines += [
        (
            f"Target: the baseline@1.0's median final validation accuracy, {pct(target, 2)} "
            f"({len(full)} seeds). Per run: the first evaluated step at which validation accuracy "
            "reaches it, and the wall-clock to that epoch's end (training + evaluation time as "
            "logged in the run, so disturbed by whatever else ran on the machine), and the same "
            "first step times the method's training-step cost measured alone (`overhead.md`; "
            "training steps only, no evaluation)."
        ),
        "",
        (
            "| method | budget | runs | reach the target | median first step | median wall-clock (s) "
            "| at the step cost measured alone (s) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for m, b in dict.fromkeys((m, b) for m, b, _ in suite.grid()):
        cell_runs = cell(runs, m, b)
        if not cell_runs:
            continue
        steps, walls = [], []
        for r in cell_runs.values():
            clock = 0.0
            for e in r.epochs:
                clock += float(e.get("epoch_time") or 0.0)
                if e["val_acc"] >= target:
                    steps.append(e["step"])
                    walls.append(clock)
                    break
        reached = f"{len(steps)} of {len(cell_runs)} ({100 * len(steps) / len(cell_runs):.0f}%)"
        med_step = f"{np.median(steps):.0f}" if steps else "—"
        med_wall = f"{np.median(walls):.0f}" if walls else "—"
        alone = "—"
        if steps and m in costs:
            alone = f"{np.median(steps) * float(costs[m]['step_s_median']):.0f}"
        elif steps:
            alone = "(not measured)"
        lines.append(
            f"| {m} | {b:g} | {len(cell_runs)} | {reached} | {med_step} | {med_wall} | {alone} |"
        )
    return [*lines, ""]


def _equivalent_budgets(runs) -> tuple[list[str], dict[str, SweepResult]]:
    base = {
        b: {s: r.test_acc for s, r in cell(runs, "baseline", b).items()} for b in (0.6, 0.8, 1.0)
    }
    base = {b: c for b, c in base.items() if c}
    lines = ["## Equivalent budget", ""]
    methods = sorted({r.method for r in runs if r.method != "baseline"})
    at_full = [m for m in methods if cell(runs, m, 1.0)]
    if len(base) < 2 or 1.0 not in base or not at_full:
        pending = "Pending: needs the baseline at two or more budgets and a method at 1.0."
        return [*lines, pending, ""], {}
    lines += [
        (
            "Read on the mean final test accuracy curves (made monotone, piecewise linear between "
            f"the budgets run; baseline at {', '.join(f'{b:g}' for b in sorted(base))}) on the "
            "seeds common to every cell: **equivalent budget** = where the baseline's curve reaches "
            "the method's 100% accuracy; **epoch saving** = 1 − the budget at which the method's "
            "curve reaches the baseline's 100% accuracy (a method run at 100% only has no curve: "
            "its saving reads ≥0% when its 100% run reaches the baseline's, not reached otherwise). "
            "Intervals: 95% paired bootstrap over seeds."
        ),
        "",
        "| method | seeds | equivalent budget [95% CI] | epoch saving [95% CI] | P(reach) |",
        "|---|---|---|---|---|",
    ]
    readings: dict[str, SweepResult] = {}
    for m in at_full:
        cells = {b: {s: r.test_acc for s, r in cell(runs, m, b).items()} for b in (0.6, 0.8, 1.0)}
        cells = {b: c for b, c in cells.items() if c}
        try:
            res = budget_sweep(cells, base, full=1.0)
        except ValueError as err:
            lines.append(f"| {m} | 0 | ({err}) | | |")
            continue
        readings[m] = res
        lines.append(
            f"| {m} | {len(res.seeds)} | {fmt_reading(res.equivalent, compact=True)} "
            f"| {fmt_reading(res.saving, compact=True)} | {res.p_reach:.2f} |"
        )
    return [*lines, ""], readings


def _in_wall_clock(r: BudgetReading, to_clock) -> BudgetReading:
    """A budget reading carried into wall-clock by ``to_clock``, an increasing map; bounds
    that are not reached stay so."""
    if r.value is None:
        return r
    low = None if r.low is None else to_clock(r.low)
    high = None if r.high is None else to_clock(r.high)
    return BudgetReading(to_clock(r.value), r.censor, low, high)


def _wall_clock(readings: dict[str, SweepResult], costs: dict[str, dict]) -> list[str]:
    """The equivalent budget and the epoch saving in wall-clock, from the step costs measured
    alone: a method whose step costs ``r`` times the baseline's reaches the baseline@1.0's
    accuracy at ``(1 - saving) * r`` of the baseline's wall-clock (wall-clock saving
    ``1 - (1 - saving) * r``), and its full run, ``r`` of the baseline's wall-clock, buys what
    the baseline reaches at ``equivalent`` of its budget (per unit of wall-clock:
    ``equivalent / r``)."""
    if not readings:
        return []
    lines = ["## Equivalent budget in wall-clock (step costs measured alone)", ""]
    if not costs or "baseline" not in costs:
        command = "python -m experiments.bench.bench_methods --suite <suite>"
        return [*lines, f"Pending: no step costs measured alone yet (`{command}`).", ""]
    lines += [
        (
            f"Step cost: each method's median training-step time measured alone, as a ratio "
            f"to the baseline's ({float(costs['baseline']['step_s_median']):.3f} s; "
            "[`overhead.md`](overhead.md), its command, machine and date). **Wall-clock "
            "saving** = 1 − (1 − epoch saving) × ratio: the share of the baseline@1.0's training "
            "time saved in reaching its accuracy. **Wall-clock equivalent** = equivalent budget / "
            "ratio: the baseline's training time that one unit of the method's training time "
            "buys. Intervals: the bootstrap intervals of the table above carried through; the "
            "step-cost ratio is taken as exact (`overhead.md` gives each method's median and "
            "fastest step, and how it was measured). Training steps only: evaluation is the same "
            "for every method."
        ),
        "",
        (
            "| method | step cost vs baseline | wall-clock equivalent [95% CI] "
            "| wall-clock saving [95% CI] |"
        ),
        "|---|---|---|---|",
    ]
    for m, res in readings.items():
        if m not in costs:
            lines.append(f"| {m} | (not measured) | | |")
            continue
        ratio = float(costs[m]["ratio"])
        equivalent = _in_wall_clock(res.equivalent, lambda e, r=ratio: e / r)
        saving = _in_wall_clock(res.saving, lambda s, r=ratio: 1.0 - (1.0 - s) * r)
        lines.append(
            f"| {m} | {ratio:.3f}× | {fmt_reading(equivalent, compact=True)} | {fmt_reading(saving, compact=True)} |"
        )
    return [*lines, ""]


# Exploratory comparisons among GCGD and its parts (not pre-registered: reported beside the
# pre-registered ones, with no multiplicity correction). Each side is a signed sum of cells
# at 100% budget: ((+1, "gcgd"), (-1, "gc_w")) reads GCGD − GC-W, per seed.
EXPLORATORY: dict[str, tuple[tuple[int, str], ...]] = {
    "GCGD − GC-W v1 alone": ((1, "gcgd"), (-1, "gc_w")),
    "GCGD − GC-ODE gradient alone": ((1, "gcgd"), (-1, "gc_ode_gradient")),
    "GC-ODE gradient − its scale-only control": ((1, "gc_ode_gradient"), (-1, "gc_ode_scale_only")),
    "GC-W v2 − GC-W v1": ((1, "gc_w_v2"), (-1, "gc_w")),
    "interaction: GCGD − GC-W v1 − GC-ODE gradient + baseline": (
        (1, "gcgd"),
        (-1, "gc_w"),
        (-1, "gc_ode_gradient"),
        (1, "baseline"),
    ),
}


def _exploratory(runs: list[Run]) -> list[str]:
    """GCGD against its parts, and each part against its control, paired over the seeds every
    cell of a row ran (at 100% budget)."""
    rows = []
    for name, terms in EXPLORATORY.items():
        cells = [(sign, cell(runs, m, 1.0)) for sign, m in terms]
        seeds = sorted(set.intersection(*(set(c) for _, c in cells)))
        if len(seeds) < 2:
            continue
        plus = {s: sum(100 * c[s].test_acc for sign, c in cells if sign > 0) for s in seeds}
        minus = {s: sum(100 * c[s].test_acc for sign, c in cells if sign < 0) for s in seeds}
        c = paired(plus, minus)
        per_seed = ", ".join(pp(d) for d in c.diffs)
        rows.append(
            f"| {name} | {', '.join(map(str, seeds))} | {pp_ci(c)} | {per_seed} | {c.p_value:.3g} |"
        )
    if not rows:
        return []
    return [
        "## Exploratory: GCGD against its parts (not pre-registered)",
        "",
        (
            "Final test accuracy at 100% budget, paired over the seeds every term ran; 95% "
            "Student-t interval and two-sided paired t-test, **no multiplicity correction**: "
            "these comparisons were chosen after the pre-registration, to read which part of "
            "GCGD its difference from the baseline comes from. The interaction is zero when "
            "the parts' differences from the baseline add up to GCGD's."
        ),
        "",
        "| comparison (pp) | seeds | mean [95% t-CI] | per seed | p |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


# Epoch-record keys every run logs; any other numeric key is a method's own diagnostic.
_COMMON_KEYS = frozenset(
    {
        "kind", "epoch", "step", "lr", "train_loss", "train_acc", "train_time", "epoch_time",
        "eval_time", "step_time_median", "images_per_s", "skipped_steps", "val_loss", "val_acc",
    }
)  # fmt: skip


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g} – {hi:.3g}"


def _diagnostics(runs: list[Run], suite: SuiteGrid) -> list[str]:
    """The methods' own diagnostics (e.g. GC-ODE's gate and gradient ratio, GC-W's predictor
    loss): their range over a cell's runs after the first and after the last epoch."""
    rows = []
    for m, b in dict.fromkeys((m, b) for m, b, _ in suite.grid()):
        cell_runs = sorted(cell(runs, m, b).values(), key=lambda r: r.seed)
        if not cell_runs:
            continue
        keys = [
            k for k, v in cell_runs[0].epochs[0].items() if k not in _COMMON_KEYS and _number(v)
        ]
        for k in keys:
            first = [r.epochs[0].get(k) for r in cell_runs]
            last = [r.epochs[-1].get(k) for r in cell_runs]
            if any(v is None for v in first + last):
                continue
            rows.append(
                f"| {m} | {b:g} | {len(cell_runs)} | `{k}` | {_range(first)} | {_range(last)} |"
            )
    if not rows:
        return []
    return [
        "## Method diagnostics (epoch records)",
        "",
        (
            "Each method's own metrics as its runs' epoch records log them (`metrics.jsonl`; "
            "the reductions are `gcgd_jax.models.gc_ode.aux_spec`'s and the trainer's): "
            "GC-ODE's `gc_ode_loss` (its auxiliary loss) and `gc_ode_grad_ratio` (the gradient "
            "norm reaching the paired stages' inputs relative to the plain path's, mean over "
            "pairs) are epoch means, `gc_ode_gate` (the pairs' mean gate) and the "
            "optimizer-state metrics (`gc_w_predictor_loss`, `gc_w_v2_objective`) the epoch's "
            "last step's. Range (lowest – highest) over the cell's runs, after the first and "
            "after the last epoch."
        ),
        "",
        "| method | budget | runs | metric | after epoch 1 | after the last epoch |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _progress(suite_dir: Path, suite: SuiteGrid) -> list[str]:
    lines = [
        "## Progress",
        "",
        "| phase | methods | budgets | seeds | finished |",
        "|---|---|---|---|---|",
    ]
    for i, p in enumerate(suite.phases, 1):
        cells = p.cells()
        done = sum(is_complete(run_dir(suite_dir, *c)) for c in cells)
        lines.append(
            f"| {i} | {', '.join(p.methods)} | {', '.join(f'{b:g}' for b in p.budgets)} "
            f"| {', '.join(map(str, p.seeds))} | {done} of {len(cells)} |"
        )
    return [*lines, ""]


def _plots(suite_dir: Path, runs: list[Run]) -> list[str]:
    if not runs:
        return []
    plt = pyplot()
    methods = sorted({r.method for r in runs}, key=lambda m: (m != "baseline", m != "gcgd", m))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        for b, ls in ((1.0, "-"), (0.8, "--"), (0.6, ":")):
            cell_runs = list(cell(runs, m, b).values())
            if not cell_runs:
                continue
            n = min(len(r.epochs) for r in cell_runs)
            acc = 100 * np.array([[e["val_acc"] for e in r.epochs[:n]] for r in cell_runs])
            mean_with_band(ax, acc, ls=ls, color=colors[m], label=f"{m}@{b:g} (n={len(cell_runs)})")
    finish(
        fig,
        ax,
        suite_dir / "accuracy_vs_epoch.png",
        xlabel="epoch",
        ylabel="validation accuracy (%)",
        title="Validation accuracy vs epoch (mean, 95% bootstrap band over seeds)",
        legend_size=7,
        legend_cols=2,
    )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        budgets = sorted({r.budget for r in runs if r.method == m})
        means = [100 * np.mean([r.test_acc for r in cell(runs, m, b).values()]) for b in budgets]
        style = {"color": "k", "lw": 2} if m == "baseline" else {"color": colors[m]}
        ax.plot([100 * b for b in budgets], means, marker="o", label=m, **style)
    finish(
        fig,
        ax,
        suite_dir / "accuracy_vs_budget.png",
        xlabel="budget (% of the 1,600-step schedule)",
        ylabel="mean final test accuracy (%)",
        title="Accuracy vs budget (baseline curve: the interpolation the budgets read)",
    )
    return [
        "## Plots",
        "",
        "![validation accuracy vs epoch](accuracy_vs_epoch.png)",
        "",
        "![accuracy vs budget](accuracy_vs_budget.png)",
        "",
    ]


def build_long_report(suite_dir: Path, suite: SuiteGrid, *, notes: str = "") -> str:
    """Writes ``RESULTS.md`` (and the plots, once runs exist) into ``suite_dir``."""
    suite_dir = Path(suite_dir)
    suite_dir.mkdir(parents=True, exist_ok=True)
    runs = load_long_runs(suite_dir)
    verdict, primary_table = _primary(runs, suite)
    lines = [f"# Suite {suite.name}", "", *verdict, "", *primary_table, ""]
    lines += ["## Pre-registration", "", suite.preregistration.strip(), ""]
    lines += ["## Settings", "", notes.strip(), ""] if notes else []
    sweep = suite_dir.parent / "lr_sweep" / suite.name / "SWEEP.md"
    if sweep.exists():
        chosen = json.loads(sweep.with_name("sweep.json").read_text())["chosen_lr"]
        lines += [
            (
                f"Learning rate {chosen:g}: chosen for the baseline on the validation split, "
                f"[`../lr_sweep/{suite.name}/SWEEP.md`](../lr_sweep/{suite.name}/SWEEP.md)."
            ),
            "",
        ]
    lines += _progress(suite_dir, suite)
    lines += _sanity(runs)
    table, _ = _accuracy_table(runs, suite)
    lines += table
    costs = clean_step_costs(suite_dir)
    lines += _time_to_result(runs, suite, costs)
    equivalent, readings = _equivalent_budgets(runs)
    lines += equivalent
    lines += _wall_clock(readings, costs)
    lines += _exploratory(runs)
    lines += _diagnostics(runs, suite)
    commits = sorted({str(r.info.get("commit")) for r in runs})
    dirty = [r for r in runs if r.info.get("clean_tree") is False]
    if runs:
        lines += [
            "## Provenance",
            "",
            (
                f"{len(runs)} finished runs from commit(s) {', '.join(f'`{c}`' for c in commits)}; "
                f"{len(dirty)} from a tree with changes. Each run's `run.json` holds its command, "
                "machine, date, wall time and peak RSS; `config.toml` its configuration."
            ),
            "",
        ]
    if (suite_dir / "DISCUSSION.md").exists():  # its own page: linked, not copied in
        lines += [
            "## Discussion",
            "",
            "What these tables say, written by hand: [`DISCUSSION.md`](DISCUSSION.md).",
            "",
        ]
    lines += _plots(suite_dir, runs)
    return write_results(suite_dir, lines)
