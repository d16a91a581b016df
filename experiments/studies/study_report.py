"""What the reports of the ``gcgd-train`` studies share (``forward_report``, ``guess_report``):
the finished grid runs, paired comparisons by seed and their verdicts, the "every variant"
and learning-rate tuning tables, the per-epoch curves and the frame of ``RESULTS.md``.

Generic over the variants: each report passes its labels' display names (``names``), the
reference of the step-time ratios and the compared :class:`Metric`; every table is built
from the runs' ``metrics.jsonl`` and ``run.json`` only.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from experiments.studies.study import Study, final_val_acc, run_dir, tuned_lrs
from experiments.suites.plots import finish, mean_with_band, pyplot
from experiments.suites.report import pp_ci, write_results
from experiments.suites.stats import PairedComparison, holm, paired, t_mean_ci
from gcgd_jax.train.report import read_metrics


@dataclass(frozen=True)
class Run:
    """A finished grid run: its test-accuracy and training-loss curves, status and median
    step time."""

    benchmark: str
    label: str
    seed: int
    test_acc: tuple[float, ...]  # fraction, per evaluated epoch
    train_loss: tuple[float, ...]  # per epoch
    status: str
    step_time: float | None

    @property
    def errors(self) -> tuple[float, ...]:
        """Test error (%) per evaluated epoch."""
        return tuple(100.0 * (1.0 - a) for a in self.test_acc)

    @property
    def accuracies(self) -> tuple[float, ...]:
        """Test accuracy (%) per evaluated epoch."""
        return tuple(100.0 * a for a in self.test_acc)


class Metric(NamedTuple):
    """The compared number: its name in the tables and a run's final value (%)."""

    name: str
    final: Callable[[Run], float]


ERROR = Metric("test error", lambda r: r.errors[-1])
ACCURACY = Metric("test accuracy", lambda r: r.accuracies[-1])


def load_runs(out: Path, study: Study) -> list[Run]:
    """Every finished run of the grid (tuning runs are read by :func:`tuned_lrs`)."""
    runs = []
    for phase_labels, seeds in study.phases:
        for benchmark in study.benchmarks:
            for label in phase_labels:
                for seed in seeds:
                    records = read_metrics(run_dir(out, benchmark, label, seed) / "metrics.jsonl")
                    if not records or records[-1].get("kind") != "summary":
                        continue
                    epochs = [r for r in records if r.get("kind") == "epoch"]
                    accs = tuple(r["test_acc"] for r in epochs if r.get("test_acc") is not None)
                    if not accs:
                        continue
                    losses = tuple(
                        r["train_loss"] for r in epochs if r.get("train_loss") is not None
                    )
                    times = [r["step_time_median"] for r in epochs if r.get("step_time_median")]
                    runs.append(
                        Run(
                            benchmark, label, seed, accs, losses, records[-1].get("status", "?"),
                            statistics.median(times) if times else None,
                        )
                    )  # fmt: skip
    return runs


def grid_labels(study: Study) -> list[str]:
    """The grid's variants, phase by phase."""
    return [v for phase, _ in study.phases for v in phase]


def finals(runs: list[Run], benchmark: str, label: str, metric: Metric) -> dict[int, float]:
    """Seed -> the final value of ``metric`` of one variant's runs."""
    return {r.seed: metric.final(r) for r in runs if r.benchmark == benchmark and r.label == label}


def compare(
    runs: list[Run], benchmark: str, a: str, b: str, metric: Metric
) -> PairedComparison | None:
    """``a`` minus ``b`` paired by seed (None while they share no seed)."""
    x, y = finals(runs, benchmark, a, metric), finals(runs, benchmark, b, metric)
    return paired(x, y) if set(x) & set(y) else None


def ci(c: PairedComparison | None) -> str:
    return "—" if c is None else pp_ci(c)


def mean_ci(values: list[float]) -> str:
    """Mean [95% Student-t interval], the mean alone on one value, — on none."""
    if not values:
        return "—"
    mean, low, high = t_mean_ci(values)
    return f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def incomplete(c: PairedComparison | None, seeds: int) -> str | None:
    """``incomplete (k of n seeds)`` while the comparison lacks seeds, else None."""
    done = 0 if c is None else c.n
    return None if done >= seeds else f"incomplete ({done} of {seeds} seeds)"


def verdict_below(c: PairedComparison | None, seeds: int) -> str:
    """Supported when the interval's upper end is below 0."""
    return incomplete(c, seeds) or ("supported" if c.t_high < 0 else "not supported")


def verdict_above(c: PairedComparison | None, seeds: int) -> str:
    """Supported when the interval's lower end is above 0."""
    return incomplete(c, seeds) or ("supported" if c.t_low > 0 else "not supported")


def holm_p(comparisons: dict[str, PairedComparison | None]) -> dict[str, str]:
    """Each comparison's p-value cell: the paired t-test's p and whether Holm over those
    with two seeds or more rejects 0 (— for the others)."""
    family = {k: c.p_value for k, c in comparisons.items() if c is not None and c.n > 1}
    rejects = holm(family) if family else {}
    return {
        k: f"{c.p_value:.3g} ({'rejects 0' if rejects[k] else 'does not reject 0'})"
        if k in rejects
        else "—"
        for k, c in comparisons.items()
    }


def endpoint_row(
    name: str, c: PairedComparison | None, criterion: str, verdict: str, p: str
) -> str:
    """A row of an endpoint table: comparison, seeds, Δ, criterion, verdict, p (Holm)."""
    return f"| {name} | {0 if c is None else c.n} | {ci(c)} | {criterion} | {verdict} | {p} |"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def variant_table(
    runs: list[Run],
    study: Study,
    out: Path,
    benchmark: str,
    *,
    metric: Metric,
    names: dict[str, str],
    reference: str,
    paper: dict[str, float] | None = None,
    flag_grid_end: bool = False,
) -> list[str]:
    """The "every variant" table: the final ``metric`` (mean [95% t interval]), ``paper``'s
    number if given, the chosen learning rate, the median step time as a ratio to
    ``reference``'s on the same seed (median [range] over seeds) and flags (runs that did not
    complete; with ``flag_grid_end``, a chosen rate at an end of the tuning grid)."""
    lrs = tuned_lrs(study, out)
    ends = (min(study.tuning.lrs), max(study.tuning.lrs)) if study.tuning else ()
    columns = ["variant", "seeds", f"{metric.name} (%)", *(["paper (%)"] * (paper is not None))]
    columns += ["learning rate", f"step time × {names[reference]}", "flags"]
    lines = [_row(columns), "|" + "---|" * len(columns)]
    ref = {r.seed: r.step_time for r in runs if r.label == reference and r.benchmark == benchmark}
    for label in grid_labels(study):
        mine = [r for r in runs if r.label == label and r.benchmark == benchmark]
        ratios = [r.step_time / ref[r.seed] for r in mine if r.step_time and ref.get(r.seed)]
        cost = "—"
        if ratios:
            cost = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
        lr = lrs.get((benchmark, label))
        flags = ["learning rate at the grid's end"] if flag_grid_end and lr in ends else []
        flags += sorted({f"s{r.seed} {r.status}" for r in mine if r.status != "completed"})
        cells = [names[label], str(len(mine)), mean_ci([metric.final(r) for r in mine])]
        if paper is not None:
            cells.append("—" if label not in paper else f"{paper[label]:.2f}")
        cells += ["—" if lr is None else f"{lr:g}", cost, ", ".join(flags) or "—"]
        lines.append(_row(cells))
    return lines


def pairs_table(
    runs: list[Run],
    benchmark: str,
    pairs: Sequence[tuple[str, str]],
    *,
    metric: Metric,
    names: dict[str, str],
    seeds: int,
) -> list[str]:
    """Descriptive paired differences ``a − b`` (pp of ``metric``), incomplete ones noted."""
    lines = ["| comparison | Δ " + metric.name + " (pp) |", "|---|---|"]
    for a, b in pairs:
        c = compare(runs, benchmark, a, b, metric)
        note = incomplete(c, seeds)
        lines.append(f"| {names[a]} − {names[b]} | {ci(c)}{'' if note is None else f' ({note})'} |")
    return lines


def tuning_section(study: Study, out: Path, benchmark: str, names: dict[str, str]) -> list[str]:
    """The learning-rate tuning: mean final validation accuracy per rate, the chosen in bold."""
    t = study.tuning
    if t is None:
        return []
    lines = [
        "## Learning-rate tuning (validation split)",
        "",
        (
            f"Mean final validation accuracy (%) over tuning seed{'s' * (len(t.seeds) > 1)} "
            f"{', '.join(map(str, t.seeds))} (0 for a run stopped by a non-finite loss; — while "
            "unfinished); the chosen rate in bold."
        ),
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in t.lrs) + " |",
        "|---|" + "---|" * len(t.lrs),
    ]
    chosen = tuned_lrs(study, out)
    for label in t.variants:
        cells = []
        for lr in t.lrs:
            scores = [final_val_acc(run_dir(out, benchmark, label, s, lr)) for s in t.seeds]
            text = "—" if None in scores else f"{100 * float(np.mean(scores)):.2f}"
            cells.append(f"**{text}**" if chosen.get((benchmark, label)) == lr else text)
        lines.append(f"| {names[label]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot_curves(
    runs: list[Run],
    labels: Sequence[str],
    benchmark: str,
    path: Path,
    *,
    curve: Callable[[Run], Sequence[float]],
    names: dict[str, str],
    ylabel: str,
    title: str,
    log: bool = False,
) -> bool:
    """Plots ``curve`` per epoch (seed mean, 95% band, the epochs every seed has) of each of
    ``labels`` with a finished run into ``path``; False when there is nothing to plot."""
    by_label = {}
    for label in labels:
        curves = [curve(r) for r in runs if r.label == label and r.benchmark == benchmark]
        curves = [c for c in curves if c and np.all(np.isfinite(c))]
        if curves:
            by_label[label] = curves
    if not by_label:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab10")
    for i, (label, curves) in enumerate(by_label.items()):
        n = min(len(c) for c in curves)
        mean_with_band(ax, np.array([c[:n] for c in curves]), color=colors(i), label=names[label])
    if log:
        ax.set_yscale("log")
    finish(fig, ax, path, xlabel="epoch", ylabel=ylabel, title=title)
    return True


def error_sanity(runs: list[Run], study: Study, benchmark: str, threshold: float) -> list[str]:
    """The forward-gradient studies' sanity check: BP's mean final test error below
    ``threshold`` (%), else the protocol is too short to compare with the paper. Read
    while fewer BP runs are finished than the grid has seeds, it is marked provisional."""
    seeds = len(study.phases[0][1])
    bp = list(finals(runs, benchmark, "bp", ERROR).values())
    if not bp:
        return ["## Sanity check", "", "BP has no finished run yet.", ""]
    mean = float(np.mean(bp))
    verdict = "passed" if mean < threshold else (
        "FAILED: the protocol is too short to compare with the paper"
    )  # fmt: skip
    if len(bp) < seeds:
        verdict += f" (provisional: {len(bp)} of {seeds} seeds)"
    return [
        "## Sanity check",
        "",
        (
            f"BP's mean final test error: {mean:.2f}% over {len(bp)} "
            f"seed{'s' if len(bp) != 1 else ''} (criterion: below {threshold:g}%): {verdict}."
        ),
        "",
    ]


def error_curves(
    runs: list[Run], study: Study, out: Path, benchmark: str, names: dict[str, str], log: bool
) -> list[str]:
    """The test-error-per-epoch section and its plot (``test_error_<benchmark>.png``)."""
    name = f"test_error_{benchmark}.png"
    drawn = plot_curves(
        runs, grid_labels(study), benchmark, Path(out) / name, curve=lambda r: r.errors,
        names=names, ylabel="test error (%)",
        title=f"{benchmark}: test error per epoch (seed mean, 95% band)", log=log,
    )  # fmt: skip
    return ["## Test error per epoch", "", f"![test error per epoch]({name})", ""] if drawn else []


def machines(out: Path) -> list[str]:
    """The machines the grid runs ran on (their ``run.json``)."""
    return sorted({json.loads(p.read_text()).get("machine", "?") for p in _run_jsons(out)})


def loads(out: Path) -> list[float]:
    """The 1-minute load average when each grid run ended (their ``run.json``)."""
    found = (json.loads(p.read_text()).get("load_avg") for p in _run_jsons(out))
    return sorted(float(load[0]) for load in found if load)


def _run_jsons(out: Path) -> list[Path]:
    return sorted((Path(out) / "runs").glob("*/*/s*/run.json"))


def write_report(
    out: Path,
    study: Study,
    title: str,
    sections: Callable[[Path, Study, list[Run], str], list[str]],
) -> Path:
    """Writes ``out/RESULTS.md``: ``# Study <name>: <title>``, the description, the paper,
    the grid runs finished and the machines, ``sections`` of each benchmark, then the
    pre-registration verbatim and the expected time. Returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out, study)
    total = sum(1 for c in study.cells() if c.phase > 0)
    lines = [
        f"# Study {study.name}: {title}",
        "",
        study.description,
        "",
        (
            f"Paper: {study.paper_setting}. Grid runs finished: {len(runs)} of {total}. "
            f"Machine: {'; '.join(machines(out)) or '—'}."
        ),
        "",
    ]
    for benchmark in study.benchmarks:
        lines += sections(out, study, runs, benchmark)
    lines += ["## Pre-registration", "", study.preregistration, ""]
    lines += [f"Expected time: {study.expected_time}.", ""]
    write_results(out, lines)
    return out / "RESULTS.md"
