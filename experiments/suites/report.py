"""A suite's report (``RESULTS.md`` + PNG plots), rebuilt from its runs: the pieces every
suite's report shares, and the budget-sweep suites' report.

Layout read (written by ``experiments.suites.compare``)::

    <suite_dir>/runs/<method>/b<budget>/s<seed>/metrics.jsonl
    <suite_dir>/runs/<method>/b<budget>/s<seed>/run.json   (command, peak RSS, wall time)

Each ``metrics.jsonl`` holds one JSON record per epoch (``epoch``, ``test_acc`` or
``val_acc``, ``step_time_median``, ...) and, once the run has finished, a last record with
``"kind": "summary"`` (as :mod:`gcgd_jax.train` writes them, read with its
:func:`~gcgd_jax.train.report.read_metrics`).

The shared pieces: the run folders (:func:`run_dir`, :func:`is_complete`), the finished runs
(:class:`Run`, :func:`load_runs`), one cell of the grid (:func:`cell`), the formatters
(:func:`pct`, :func:`pp`, :func:`pp_ci`, :func:`fmt_reading`), the step costs measured
alone (:func:`clean_step_costs`) and the writing of ``RESULTS.md``
(:func:`write_results`). :func:`build_report` is the budget-sweep suites' report;
:mod:`experiments.suites.long_report` adds the pre-registered long suite's sections.

Usage: ``python -m experiments.suites.report experiments/results/<suite>``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.suites.plots import finish, mean_with_band, pyplot
from experiments.suites.stats import (
    BudgetReading,
    PairedComparison,
    budget_sweep,
    holm,
    paired,
    t_mean_ci,
)
from gcgd_jax.train.report import read_metrics

__all__ = [
    "Run",
    "build_report",
    "cell",
    "clean_step_costs",
    "fmt_reading",
    "is_complete",
    "load_runs",
    "pct",
    "pp",
    "pp_ci",
    "run_dir",
    "write_results",
]


# ------------------------------------------------------------------------------ the runs


def run_dir(out: Path, method: str, budget: float, seed: int) -> Path:
    """The folder of one cell of a suite's grid."""
    return Path(out) / "runs" / method / f"b{budget:g}" / f"s{seed}"


def _finished(records: list[dict]) -> bool:
    return bool(records) and records[-1].get("kind") == "summary"


def is_complete(directory: Path) -> bool:
    """Whether the run in ``directory`` has finished: its ``metrics.jsonl`` ends with its
    summary record."""
    return _finished(read_metrics(Path(directory) / "metrics.jsonl"))


@dataclass(frozen=True)
class Run:
    """One finished run of a suite: its cell, its evaluated epoch records, its summary
    record and its ``run.json`` (empty when there is none)."""

    method: str
    budget: float
    seed: int
    folder: Path
    epochs: list[dict]  # the epoch records that carry the evaluated accuracy
    summary: dict
    info: dict

    @property
    def final_acc(self) -> float:
        """The last evaluated epoch's ``test_acc`` (the short suites evaluate the test split
        every epoch)."""
        return float(self.epochs[-1]["test_acc"])

    @property
    def test_acc(self) -> float:
        """The summary's ``final_test_acc`` (the long suite evaluates the test split once,
        after the last step)."""
        return float(self.summary["final_test_acc"])

    @property
    def val_acc(self) -> float:
        return float(self.summary["final_val_acc"])

    @property
    def step_time(self) -> float:
        if "step_time_median" in self.summary:
            return float(self.summary["step_time_median"])
        return float(np.median([e["step_time_median"] for e in self.epochs]))


def load_runs(suite_dir: Path, *, evaluated: str = "test_acc") -> list[Run]:
    """The finished runs under ``suite_dir/runs``, in folder order; a run's ``epochs`` are its
    epoch records that carry ``evaluated`` (``test_acc``, or the long suite's ``val_acc``).
    Unfinished runs are left out (the runner resumes them)."""
    runs = []
    for metrics in sorted(Path(suite_dir, "runs").glob("*/b*/s*/metrics.jsonl")):
        records = read_metrics(metrics)
        if not _finished(records):
            continue
        folder = metrics.parent
        info = folder / "run.json"
        runs.append(
            Run(
                method=folder.parent.parent.name,
                budget=float(folder.parent.name[1:]),
                seed=int(folder.name[1:]),
                folder=folder,
                epochs=[
                    r for r in records if r.get("kind") == "epoch" and r.get(evaluated) is not None
                ],
                summary=records[-1],
                info=json.loads(info.read_text()) if info.exists() else {},
            )
        )
    return runs


def cell(runs: list[Run], method: str, budget: float) -> dict[int, Run]:
    """One cell of the grid: seed -> run of ``method`` at ``budget``, in the order of ``runs``."""
    return {r.seed: r for r in runs if r.method == method and math.isclose(r.budget, budget)}


# ------------------------------------------------------------------------------ formatting


def pct(x: float | None, digits: int = 0) -> str:
    """A fraction as a percentage (``—`` for ``None``)."""
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def pp(x: float) -> str:
    """A difference in percentage points, signed, two decimals (``∞`` when not finite)."""
    return f"{x:+.2f}" if math.isfinite(x) else "∞"


def pp_ci(c: PairedComparison, *, scale: float = 1.0) -> str:
    """A paired difference with its Student-t 95% interval in pp, ``+1.20 [+0.40, +2.00]``
    (``+1.20 (n = 1)`` on one seed); ``scale``: pp per unit of the compared values (100 when
    they are fractions)."""
    if c.n < 2:
        return f"{pp(scale * c.mean)} (n = 1)"
    return f"{pp(scale * c.mean)} [{pp(scale * c.t_low)}, {pp(scale * c.t_high)}]"


def fmt_reading(r: BudgetReading, *, compact: bool = False) -> str:
    """A budget reading with its censoring and interval, ``≥ 50% [30%, 50%]`` or
    ``not reached [—, 60%]``; ``compact`` (the long report's style): ``≥50% [30%, 50%]``, and
    ``not reached`` alone."""
    if r.value is None:
        if compact:
            return "not reached"
        head = "not reached"
    else:
        head = f"{r.censor}{'' if compact else ' '}{pct(r.value)}".strip()
    return f"{head} [{pct(r.low)}, {pct(r.high)}]"


def clean_step_costs(suite_dir: Path) -> dict[str, dict]:
    """Per-method step costs measured alone (``overhead.json`` of
    ``experiments.bench.bench_methods``): method -> its record (``ratio`` to the baseline,
    ``step_s_median``, ...); empty when the suite has none yet."""
    path = Path(suite_dir) / "overhead.json"
    if not path.exists():
        return {}
    methods = json.loads(path.read_text()).get("methods")
    bad = not isinstance(methods, dict) or any(
        not isinstance(r, dict) or "ratio" not in r for r in methods.values()
    )
    if bad:
        raise ValueError(
            f"{path}: expected a 'methods' table of records with a 'ratio' "
            "(as experiments.bench.bench_methods writes it)"
        )
    return dict(methods)


def write_results(suite_dir: Path, lines: list[str]) -> str:
    """Writes ``lines`` as ``suite_dir/RESULTS.md``; returns its text."""
    text = "\n".join(lines)
    (Path(suite_dir) / "RESULTS.md").write_text(text)
    return text


# ------------------------------------------------------------------ the budget-sweep report


def _by_seed(runs: dict[int, Run]) -> dict[int, float]:
    return {s: r.final_acc for s, r in runs.items()}


def build_report(suite_dir: Path, *, title: str | None = None, notes: str = "") -> str:
    """Write ``RESULTS.md`` and PNG plots into ``suite_dir``; return the markdown."""
    suite_dir = Path(suite_dir)
    # a finished run with no test evaluation has no accuracy to report
    runs = [r for r in load_runs(suite_dir) if r.epochs]
    if not runs:
        raise FileNotFoundError(f"no complete runs under {suite_dir / 'runs'}")
    methods = sorted({r.method for r in runs}, key=lambda m: (m != "baseline", m))
    budgets = sorted({r.budget for r in runs})
    full = max(budgets)
    base_full = cell(runs, "baseline", full)
    clean = _clean_ratios(suite_dir)
    step_times = {
        m: float(np.median([r.step_time for r in runs if r.method == m])) for m in methods
    }
    base_step = step_times.get("baseline")

    lines = [f"# {title or suite_dir.name}", ""]
    if notes:
        lines += [notes.strip(), ""]

    # Final accuracy at the full budget, paired with the baseline seed by seed.
    lines += [
        f"## Final test accuracy at {pct(full)} budget",
        "",
        (
            "Accuracy: mean over seeds with its Student-t 95% CI. Δ: the **paired** difference "
            "from the baseline in percentage points, seed by seed on the seeds both ran "
            "(n = paired seeds), with its Student-t 95% CI (primary) and a percentile bootstrap "
            "of the paired differences (cross-check; it under-covers at n = 3-5); p: two-sided "
            "paired t-test. Verdict `+`/`−` when the Holm-corrected test across this table's "
            "methods rejects at family-wise 5%, `=` otherwise. "
            "Step time in suite: median over all of the method's runs (every budget), disturbed by "
            "whatever else ran on the machine; ratio alone: `overhead.md` (each method's step timed "
            "alone, used for the wall-clock savings when present). Peak RSS: largest over the "
            "method's runs (whole training process)."
        ),
        "",
        (
            "| method | seeds | accuracy mean [95% t-CI] | n paired | Δ vs baseline, pp [95% t-CI] "
            "| bootstrap CI of Δ | p | verdict (Holm) "
            "| step time in suite (s) | ratio in suite | ratio alone | peak RSS (MiB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_mean = float(np.mean([r.final_acc for r in base_full.values()])) if base_full else None
    comparisons: dict[str, PairedComparison] = {}
    for m in methods:
        at_full = cell(runs, m, full)
        if m != "baseline" and at_full and base_full:
            try:
                comparisons[m] = paired(_by_seed(at_full), _by_seed(base_full))
            except ValueError:
                pass  # no seed in common: reported without a difference
    rejected = holm({m: c.p_value for m, c in comparisons.items()})
    summary_rows = {}
    for m in methods:
        at_full = cell(runs, m, full)
        if not at_full:
            continue
        mean, lo, hi = t_mean_ci([r.final_acc for r in at_full.values()])
        step = step_times[m]
        suite_ratio = step / base_step if base_step else float("nan")
        ratio = clean.get(m, suite_ratio)
        rss = [
            r.info.get("peak_rss_mib") for r in runs if r.method == m and r.info.get("peak_rss_mib")
        ]
        comp = comparisons.get(m)
        n_paired, delta, boot, p_s, verdict = "", "", "", "", ""
        if comp is not None:
            n_paired, delta = str(comp.n), pp_ci(comp, scale=100)
            if comp.n >= 2:
                boot = f"[{pp(100 * comp.boot_low)}, {pp(100 * comp.boot_high)}]"
                p_s = f"{comp.p_value:.3g}"
                verdict = ("+" if comp.mean > 0 else "−") if rejected[m] else "="
        acc_ci = f"[{100 * lo:.2f}, {100 * hi:.2f}]" if len(at_full) > 1 else "(n = 1)"
        rss_s = f"{max(rss):.0f}" if rss else "—"
        lines.append(
            f"| {m} | {len(at_full)} | {pct(mean, 2)} {acc_ci} | {n_paired} | {delta} | {boot} "
            f"| {p_s} | {verdict} | {step:.3f} | {suite_ratio:.2f}× "
            f"| {f'{clean[m]:.2f}×' if m in clean else '—'} | {rss_s} |"
        )
        summary_rows[m] = {
            "mean": mean,
            "ratio": ratio,
            "n": len(at_full),
            "comp": comp,
            "verdict": verdict,
        }
    lines.append("")

    # Budget sweep, paired seeds.
    swept = [
        m for m in methods if m != "baseline" and len({r.budget for r in runs if r.method == m}) > 1
    ]
    sweep_rows, sweeps = {}, {}
    base_cells = {b: _by_seed(cell(runs, "baseline", b)) for b in budgets}
    base_cells = {b: c for b, c in base_cells.items() if c}
    if base_full and swept:
        lines += [
            "## Budget sweep: epochs to reach the baseline's full-budget accuracy",
            "",
            (
                f"Target: baseline mean at {pct(full)} budget = {100 * base_mean:.2f}%. "
                "Accuracy-vs-budget curves (means over the seeds common to every cell of the method "
                "and the baseline) are made monotone and read piecewise-linearly between the "
                "budgets run. **Epoch saving (primary)** = 1 − b*, b* where the method's curve "
                "reaches the target (`≥` when it already does at the smallest budget run). "
                "**Equivalent budget** = where the baseline's curve reaches the method's "
                f"{pct(full)} accuracy (`≥ 100%`: at or above the baseline; `≤`: below its "
                "smallest budget). Grid saving = the coarse reading (smallest budget run whose "
                "mean reaches). Intervals: 95% paired bootstrap over seeds (— = not reached); "
                "P(reach) = fraction of resamples that reach; wall-clock saving = 1 − b* × "
                "step-time ratio."
            ),
            "",
            "| method | n | "
            + " | ".join(f"acc @ {pct(b)}" for b in budgets)
            + " | epoch saving [95% CI] | equivalent budget [95% CI] | grid saving [95% CI] "
            "| P(reach) | wall-clock saving |",
            "|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|",
        ]
        for m in ["baseline", *swept]:
            cells = {b: _by_seed(cell(runs, m, b)) for b in budgets}
            cells = {b: c for b, c in cells.items() if c}
            accs = " | ".join(
                f"{100 * np.mean(list(cells[b].values())):.2f}% (n={len(cells[b])})"
                if b in cells
                else "—"
                for b in budgets
            )
            sweep_rows[m] = {b: float(np.mean(list(c.values()))) for b, c in cells.items()}
            if m == "baseline":
                lines.append(f"| baseline | {len(base_full)} | {accs} | | | | | |")
                continue
            try:
                res = budget_sweep(cells, base_cells, full=full)
            except ValueError:
                lines.append(f"| {m} | 0 | {accs} | (no common seeds) | | | | |")
                continue
            ratio = summary_rows.get(m, {}).get("ratio", float("nan"))
            wall = None
            if res.saving.value is not None:
                wall = 1.0 - (1.0 - res.saving.value) * ratio
            wall_s = "—" if wall is None else f"{res.saving.censor} {100 * wall:+.0f}%".strip()
            lines.append(
                f"| {m} | {len(res.seeds)} | {accs} | {fmt_reading(res.saving)} "
                f"| {fmt_reading(res.equivalent)} | {fmt_reading(res.grid)} "
                f"| {res.p_reach:.2f} | {wall_s} |"
            )
            sweeps[m] = (res, wall)
        lines.append("")

    lines += _conclusions(summary_rows, sweeps, full)
    gq = suite_dir.parent / "grad_quality" / suite_dir.name / "GRAD_QUALITY.md"
    if gq.exists():
        lines += [
            "## Gradient quality",
            "",
            (
                f"Cosine of each method's minibatch gradient with a large-batch gradient along a "
                f"baseline run: [`../grad_quality/{suite_dir.name}/GRAD_QUALITY.md`]"
                f"(../grad_quality/{suite_dir.name}/GRAD_QUALITY.md)."
            ),
            "",
        ]
    discussion = suite_dir / "DISCUSSION.md"
    if discussion.exists():
        lines += [discussion.read_text().strip(), ""]

    _plots(suite_dir, runs, methods, full, sweep_rows, summary_rows, base_mean)
    lines += [
        "## Plots",
        "",
        "![test accuracy vs epoch](accuracy_vs_epoch.png)",
        "",
        "![budget sweep](budget_sweep.png)",
        "",
        "![overhead](overhead.png)",
        "",
    ]
    return write_results(suite_dir, lines)


def _clean_ratios(suite_dir: Path) -> dict[str, float]:
    return {m: float(r["ratio"]) for m, r in clean_step_costs(suite_dir).items()}


def _conclusions(summary_rows: dict, sweeps: dict, full: float) -> list[str]:
    """Plain statements generated from the tables (no hand-written numbers)."""
    out = ["## Conclusions (generated from the tables above)", ""]
    judged = {m: r for m, r in summary_rows.items() if m != "baseline"}
    few = [m for m, r in judged.items() if not r["verdict"]]
    better = [m for m, r in judged.items() if r["verdict"] == "+"]
    worse = [m for m, r in judged.items() if r["verdict"] == "−"]
    same = [m for m, r in judged.items() if r["verdict"] == "="]
    f = pct(full)

    def _list(ms):
        parts = []
        for m in ms:
            c = summary_rows[m]["comp"]
            parts.append(
                f"{m} ({pp(100 * c.mean)} pp, paired t-CI [{pp(100 * c.t_low)}, {pp(100 * c.t_high)}], "
                f"p = {c.p_value:.2g}, n = {c.n})"
            )
        return ", ".join(parts)

    out.append(
        f"- Higher final accuracy than the baseline at {f} budget (paired t-test, Holm-corrected "
        f"across the methods, family-wise 5%): {_list(better) if better else 'none'}."
    )
    out.append(f"- Lower: {_list(worse) if worse else 'none'}.")
    out.append(
        f"- No difference detectable with these seeds: {', '.join(same) if same else 'none'}."
    )
    if few:
        out.append(f"- Too few paired seeds (< 2) to judge: {', '.join(few)}.")
    for m, (res, wall) in sweeps.items():
        sav, eq = res.saving, res.equivalent
        if sav.value is None:
            out.append(
                f"- {m}: never reaches the baseline's {f} accuracy at any budget run "
                f"(reached in {100 * res.p_reach:.0f}% of paired resamples); its {f} run is worth "
                f"{fmt_reading(eq)} of the baseline's budget."
            )
        else:
            wall_txt = f"{sav.censor} {100 * wall:+.0f}%".strip()
            out.append(
                f"- {m}: epoch saving {fmt_reading(sav)} (interpolated, paired bootstrap, "
                f"n = {len(res.seeds)} seeds; reached in {100 * res.p_reach:.0f}% of resamples); "
                f"wall-clock saving {wall_txt} at its step-time ratio "
                f"{summary_rows.get(m, {}).get('ratio', float('nan')):.2f}×."
            )
    out.append("")
    return out


def _plots(suite_dir, runs, methods, full, sweep_rows, summary_rows, base_mean) -> None:
    plt = pyplot()
    # One colour and line style per method (13+ methods: the default 10-colour cycle repeats).
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    style = {
        m: {"color": "k", "ls": "-", "lw": 2.2}
        if m == "baseline"
        else {"color": colors[(2 * i) % 20 + (i // 10) % 2], "ls": styles[i % 4], "lw": 1.4}
        for i, m in enumerate(methods)
    }

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        at_full = list(cell(runs, m, full).values())
        if not at_full:
            continue
        n_ep = min(len(r.epochs) for r in at_full)
        acc = 100 * np.array([[e["test_acc"] for e in r.epochs[:n_ep]] for r in at_full])
        mean_with_band(ax, acc, label=f"{m} (n={len(at_full)})", **style[m])
    finish(
        fig,
        ax,
        suite_dir / "accuracy_vs_epoch.png",
        xlabel="epoch",
        ylabel="test accuracy (%)",
        title=f"Test accuracy at {pct(full)} budget (mean, 95% bootstrap band)",
        legend_size=7,
        legend_cols=2,
    )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, cells in sweep_rows.items():
        b = sorted(cells)
        ax.plot([100 * x for x in b], [100 * cells[x] for x in b], marker="o", label=m, **style[m])
    if base_mean is not None:
        ax.axhline(100 * base_mean, color="k", ls="--", lw=1, label="baseline @ 100%")
    finish(
        fig,
        ax,
        suite_dir / "budget_sweep.png",
        xlabel="epoch budget (% of baseline)",
        ylabel="mean final test accuracy (%)",
        title="Budget sweep",
    )

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(summary_rows)
    any_clean = (suite_dir / "overhead.json").exists()
    ratios = [summary_rows[m]["ratio"] for m in names]
    ax.bar(names, ratios, color=["grey" if m == "baseline" else "tab:blue" for m in names])
    ax.axhline(1.0, color="k", lw=1)
    ax.tick_params(axis="x", rotation=45)
    finish(
        fig,
        ax,
        suite_dir / "overhead.png",
        ylabel="train-step time / baseline",
        title="Per-step overhead (step timed alone, overhead.md)"
        if any_clean
        else "Per-step overhead (median step time in the runs)",
        legend_size=None,
        grid=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite_dir", type=Path)
    args = parser.parse_args(argv)
    print(build_report(args.suite_dir))


if __name__ == "__main__":
    main()
