"""The report of the forward-gradient study (``forward_mnist.toml``): ``RESULTS.md`` with the
pre-registered endpoint first, then the sanity check, every variant against the paper,
the learning-rate tuning, the per-step costs and the test-error curves (PNG).

Built from the runs' ``metrics.jsonl`` and ``run.json`` only
(``python -m experiments.studies.forward_mnist --report-only``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.studies.study import Study, final_val_acc, run_dir, tuned_lrs
from experiments.suites.plots import finish, mean_with_band, pyplot
from experiments.suites.report import pp_ci, write_results
from experiments.suites.stats import PairedComparison, holm, paired, t_mean_ci
from gcgd_jax.train.report import read_metrics

LABELS = {
    "bp": "BP",
    "fg_w": "FG-W",
    "fg_a": "FG-A",
    "lg_fg_w": "LG-FG-W",
    "lg_fg_a": "LG-FG-A",
    "lg_bp": "LG-BP",
}
# Ren et al., Table 3, MNIST M/1/16 test error (%), 200 epochs
PAPER = {"bp": 2.41, "fg_w": 8.56, "fg_a": 3.76, "lg_fg_w": 5.66, "lg_fg_a": 2.55}
SANITY_BP_ERROR = 3.5  # %: BP's mean test error must be below it (pre-registered)
EQUIVALENCE_PP = 1.0  # "within 1 pp"


@dataclass(frozen=True)
class Run:
    """A finished grid run: its test-error curve (%), status and median step time."""

    benchmark: str
    label: str
    seed: int
    errors: tuple[float, ...]  # per evaluated epoch
    status: str
    step_time: float | None

    @property
    def final_error(self) -> float:
        return self.errors[-1]


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
                    errors = tuple(
                        100.0 * (1.0 - r["test_acc"])
                        for r in epochs
                        if r.get("test_acc") is not None
                    )
                    if not errors:
                        continue
                    times = [r["step_time_median"] for r in epochs if r.get("step_time_median")]
                    runs.append(
                        Run(
                            benchmark, label, seed, errors, records[-1].get("status", "?"),
                            statistics.median(times) if times else None,
                        )
                    )  # fmt: skip
    return runs


def _errors(runs: list[Run], benchmark: str, label: str) -> dict[int, float]:
    return {r.seed: r.final_error for r in runs if r.benchmark == benchmark and r.label == label}


def _compare(runs: list[Run], benchmark: str, a: str, b: str) -> PairedComparison | None:
    x, y = _errors(runs, benchmark, a), _errors(runs, benchmark, b)
    return paired(x, y) if set(x) & set(y) else None


def _ci(c: PairedComparison | None) -> str:
    return "—" if c is None else pp_ci(c)


def _mean_ci(values: list[float]) -> str:
    if not values:
        return "—"
    mean, low, high = t_mean_ci(values)
    return f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def _incomplete(c: PairedComparison | None, seeds: int) -> str | None:
    done = 0 if c is None else c.n
    return None if done >= seeds else f"incomplete ({done} of {seeds} seeds)"


def verdict_below(c: PairedComparison | None, seeds: int) -> str:
    """(a): supported when the interval's upper end is below 0."""
    return _incomplete(c, seeds) or ("supported" if c.t_high < 0 else "not supported")


def verdict_within(c: PairedComparison | None, seeds: int, margin: float = EQUIVALENCE_PP) -> str:
    """(b): supported inside [-margin, margin], contradicted entirely outside it."""
    if (msg := _incomplete(c, seeds)) is not None:
        return msg
    if -margin <= c.t_low and c.t_high <= margin:
        return "supported"
    if c.t_low > margin or c.t_high < -margin:
        return "contradicted"
    return "inconclusive"


def _endpoint(runs: list[Run], study: Study, benchmark: str) -> list[str]:
    seeds = len(study.phases[0][1])
    a = _compare(runs, benchmark, "fg_a", "fg_w")
    b = _compare(runs, benchmark, "lg_fg_a", "bp")
    family = {k: c.p_value for k, c in (("a", a), ("b", b)) if c is not None and c.n > 1}
    holm_ok = holm(family) if family else {}

    def p(key: str, c: PairedComparison | None) -> str:
        if key not in holm_ok:
            return "—"
        return f"{c.p_value:.3g} ({'rejects 0' if holm_ok[key] else 'does not reject 0'})"

    return [
        "## Endpoint (pre-registered)",
        "",
        (
            "Final test error differences in percentage points: mean paired difference over "
            "seeds [95% Student-t interval]; p: paired t-test, Holm over the two."
        ),
        "",
        "| comparison | seeds | Δ test error (pp) | criterion | verdict | p (Holm) |",
        "|---|---|---|---|---|---|",
        (
            f"| (a) FG-A − FG-W | {0 if a is None else a.n} | {_ci(a)} | upper end < 0 | "
            f"{verdict_below(a, seeds)} | {p('a', a)} |"
        ),
        (
            f"| (b) LG-FG-A − BP | {0 if b is None else b.n} | {_ci(b)} | within ±{EQUIVALENCE_PP:g} "
            f"pp | {verdict_within(b, seeds)} | {p('b', b)} |"
        ),
        "",
    ]


def _sanity(runs: list[Run], benchmark: str) -> list[str]:
    bp = list(_errors(runs, benchmark, "bp").values())
    if not bp:
        return ["## Sanity check", "", "BP has no finished run yet.", ""]
    mean = float(np.mean(bp))
    ok = mean < SANITY_BP_ERROR
    return [
        "## Sanity check",
        "",
        (f"BP's mean final test error: {mean:.2f}% over {len(bp)} seeds (criterion: below "
        f"{SANITY_BP_ERROR:g}%): {'passed' if ok else 'FAILED: the protocol is too short to compare with the paper'}."),
        "",
    ]  # fmt: skip


def _variants(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    labels = [v for phase, _ in study.phases for v in phase]
    lrs = tuned_lrs(study, out)
    lines = [
        "## Every variant",
        "",
        (
            "Final test error (%): mean over seeds [95% Student-t interval]; the paper's Table 3 "
            "(200 epochs); the learning rate chosen on the validation split; the median step time "
            "as a ratio to BP's on the same seed (median [range] over seeds)."
        ),
        "",
        "| variant | seeds | test error (%) | paper (%) | learning rate | step time × BP | flags |",
        "|---|---|---|---|---|---|---|",
    ]
    bp_time = {r.seed: r.step_time for r in runs if r.label == "bp" and r.benchmark == benchmark}
    for label in labels:
        mine = [r for r in runs if r.label == label and r.benchmark == benchmark]
        ratios = [
            r.step_time / bp_time[r.seed] for r in mine if r.step_time and bp_time.get(r.seed)
        ]
        cost = "—"
        if ratios:
            cost = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]"
        lr = lrs.get((benchmark, label))
        flags = ", ".join(
            sorted({f"s{r.seed} {r.status}" for r in mine if r.status != "completed"})
        )
        paper = PAPER.get(label)
        lines.append(
            f"| {LABELS[label]} | {len(mine)} | {_mean_ci([r.final_error for r in mine])} | "
            f"{'—' if paper is None else f'{paper:.2f}'} | {'—' if lr is None else f'{lr:g}'} | "
            f"{cost} | {flags or '—'} |"
        )
    lines.append("")
    seeds = len(study.phases[0][1])
    lines += [
        "Secondary, descriptive (paired, pp of test error):",
        "",
        "| comparison | Δ test error (pp) |",
        "|---|---|",
    ]
    for a, b in (("lg_fg_w", "fg_w"), ("lg_fg_a", "fg_a"), ("lg_bp", "bp")):
        c = _compare(runs, benchmark, a, b)
        note = _incomplete(c, seeds)
        lines.append(
            f"| {LABELS[a]} − {LABELS[b]} | {_ci(c)}{'' if note is None else f' ({note})'} |"
        )
    lines.append("")
    return lines


def _tuning(study: Study, out: Path, benchmark: str) -> list[str]:
    t = study.tuning
    if t is None:
        return []
    lines = [
        "## Learning-rate tuning (validation split)",
        "",
        (
            f"Mean final validation accuracy (%) over tuning seeds {', '.join(map(str, t.seeds))} "
            "(0 for a run stopped by a non-finite loss; — while unfinished); the chosen rate "
            "in bold."
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
        lines.append(f"| {LABELS[label]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _curves(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    labels = [v for phase, _ in study.phases for v in phase]
    plotted = [label for label in labels if any(r.label == label for r in runs)]
    if not plotted:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab10")
    for i, label in enumerate(plotted):
        curves = [r.errors for r in runs if r.label == label and r.benchmark == benchmark]
        n = min(len(c) for c in curves)
        mean_with_band(ax, np.array([c[:n] for c in curves]), color=colors(i), label=LABELS[label])
    ax.set_yscale("log")
    name = f"test_error_{benchmark}.png"
    finish(fig, ax, Path(out) / name, xlabel="epoch", ylabel="test error (%)",
           title=f"{benchmark}: test error per epoch (seed mean, 95% band)")  # fmt: skip
    return ["## Test error per epoch", "", f"![test error per epoch]({name})", ""]


def build_report(out: Path, study: Study) -> Path:
    """Writes ``out/RESULTS.md`` (and its plot) from the finished runs; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out, study)
    total = sum(1 for c in study.cells() if c.phase > 0)
    machines = sorted(
        {
            json.loads(p.read_text()).get("machine", "?")
            for p in (out / "runs").glob("*/*/s*/run.json")
        }
    )
    lines = [
        f"# Study {study.name}: forward gradients with local losses on MNIST",
        "",
        study.description,
        "",
        (
            f"Paper: {study.paper_setting}. Grid runs finished: {len(runs)} of {total}. "
            f"Machine: {'; '.join(machines) or '—'}."
        ),
        "",
    ]
    for benchmark in study.benchmarks:
        lines += _endpoint(runs, study, benchmark)
        lines += _sanity(runs, benchmark)
        lines += _variants(runs, study, out, benchmark)
        lines += _tuning(study, out, benchmark)
        lines += _curves(runs, study, out, benchmark)
    lines += ["## Pre-registration", "", study.preregistration, ""]
    lines += [f"Expected time: {study.expected_time}.", ""]
    write_results(out, lines)
    return out / "RESULTS.md"
