"""The continual-learning study's report: ``RESULTS.md`` (endpoint first) and heat maps.

Built from the finished runs under ``experiments/results/continual_mnist/runs`` (each
run's ``metrics.jsonl`` summary: ACC, BWT, FWT, the accuracy matrix, the step time) and
their ``run.json``; nothing is recomputed from a model. Paired statistics come from
:mod:`experiments.suites.stats` (Student-t on the seed-matched differences, Holm across
the primary family), the formatting from :mod:`experiments.suites.report`. Usage::

    python -m experiments.studies.continual_mnist --report-only
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.suites.plots import pyplot
from experiments.suites.report import pp_ci, write_results
from experiments.suites.stats import PairedComparison, holm, paired, t_mean_ci
from gcgd_jax.train.report import read_metrics

METHOD = "layerwise_decomposition"
BASELINES = ("agem", "gem")
CONTROL = "layerwise_decomposition_whole"
LABELS = {
    "sgd": "plain SGD",
    "agem": "A-GEM",
    "gem": "GEM",
    "layerwise_decomposition": "layerwise decomposition",
    "layerwise_decomposition_whole": "whole-network control",
    "layerwise_decomposition_official": "layerwise, authors' grouping",
    "agem_gradcl": "grad-cl's A-GEM",
}
BENCH_LABELS = {"permuted_mnist": "Permuted MNIST", "rotated_mnist": "Rotated MNIST"}


@dataclass(frozen=True)
class Run:
    """One finished run: its cell, its summary record and its ``run.json``."""

    benchmark: str
    label: str
    seed: int
    summary: dict
    info: dict


def load_runs(out: Path) -> list[Run]:
    """The finished runs under ``out/runs/<benchmark>/<label>/s<seed>``."""
    runs = []
    for metrics in sorted(Path(out, "runs").glob("*/*/s*/metrics.jsonl")):
        records = read_metrics(metrics)
        if not records or records[-1].get("kind") != "summary":
            continue
        folder = metrics.parent
        info = folder / "run.json"
        runs.append(
            Run(
                benchmark=folder.parent.parent.name,
                label=folder.parent.name,
                seed=int(folder.name[1:]),
                summary=records[-1],
                info=json.loads(info.read_text()) if info.exists() else {},
            )
        )
    return runs


def _by_seed(runs: list[Run], benchmark: str, label: str, key: str) -> dict[int, float]:
    return {
        r.seed: float(r.summary[key]) for r in runs if r.benchmark == benchmark and r.label == label
    }


def _compare(runs, benchmark, a, b, key) -> PairedComparison | None:
    x, y = _by_seed(runs, benchmark, a, key), _by_seed(runs, benchmark, b, key)
    return paired(x, y) if set(x) & set(y) else None


def _ci(c: PairedComparison | None) -> str:
    return "—" if c is None else pp_ci(c, scale=100)


def _mean_ci(values: list[float]) -> str:
    if not values:
        return "—"
    mean, low, high = t_mean_ci(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def _verdict(comparisons: list[PairedComparison | None], seeds: int) -> str:
    if any(c is None or c.n < seeds for c in comparisons):
        done = min((0 if c is None else c.n) for c in comparisons)
        return f"incomplete ({done} of {seeds} seeds)"
    return "supported" if all(c.t_low > 0 for c in comparisons) else "not supported"


def _endpoint(runs: list[Run], study) -> list[str]:
    seeds = len(study.phases[0][1])
    lines = ["## Endpoint (pre-registered)", ""]
    family = {}
    rows = []
    for benchmark in study.benchmarks:
        for base in BASELINES:
            acc = _compare(runs, benchmark, METHOD, base, "acc")
            bwt = _compare(runs, benchmark, METHOD, base, "bwt")
            key = f"{benchmark}/{base}"
            if acc is not None:
                family[key] = acc.p_value
            rows.append((benchmark, base, acc, bwt, key))
    rejected = holm(family) if family else {}
    lines += [
        (
            "ACC and BWT differences of the layerwise decomposition against each baseline, in "
            "percentage points: mean paired difference over seeds [95% Student-t interval]; "
            "p: paired t-test, Holm-corrected decision over the four ACC comparisons at 5%."
        ),
        "",
        "| benchmark | against | seeds | ΔACC (pp) | p | Holm | ΔBWT (pp) |",
        "|---|---|---|---|---|---|---|",
    ]
    for benchmark, base, acc, bwt, key in rows:
        p = "—" if acc is None or np.isnan(acc.p_value) else f"{acc.p_value:.3g}"
        decision = "—" if key not in rejected else ("rejects 0" if rejected[key] else "does not")
        lines.append(
            f"| {BENCH_LABELS.get(benchmark, benchmark)} | {LABELS[base]} | "
            f"{0 if acc is None else acc.n} | {_ci(acc)} | {p} | {decision} | {_ci(bwt)} |"
        )
    lines.append("")
    for benchmark in study.benchmarks:
        accs = [r[2] for r in rows if r[0] == benchmark]
        lines.append(
            f"- **{BENCH_LABELS.get(benchmark, benchmark)}**: the method's ACC above A-GEM's "
            f"and GEM's: **{_verdict(accs, seeds)}** (supported when both lower ends are above 0)."
        )
    lines += ["", "Secondary (a), the layerwise split against the whole-network projection:", ""]
    for benchmark in study.benchmarks:
        acc = _compare(runs, benchmark, METHOD, CONTROL, "acc")
        bwt = _compare(runs, benchmark, METHOD, CONTROL, "bwt")
        lines.append(
            f"- {BENCH_LABELS.get(benchmark, benchmark)}: ΔACC {_ci(acc)} pp, ΔBWT {_ci(bwt)} "
            f"pp: **{_verdict([acc], seeds)}**."
        )
    return [*lines, ""]


def _sanity(runs: list[Run], study) -> list[str]:
    lines = ["## Sanity checks (read before the endpoint)", ""]
    for benchmark in study.benchmarks:
        bwt = list(_by_seed(runs, benchmark, "sgd", "bwt").values())
        text = "—" if not bwt else f"{100 * np.mean(bwt):+.2f} pp"
        ok = "" if not bwt else (" (forgets: passes)" if np.mean(bwt) < -0.05 else " (FAILS)")
        lines.append(f"- {BENCH_LABELS.get(benchmark, benchmark)}: plain SGD's BWT {text}{ok}")
    gem = _compare(runs, "permuted_mnist", "gem", "sgd", "acc")
    if gem is not None:
        ok = "passes" if gem.mean > 0 else "FAILS"
        lines.append(f"- Permuted MNIST: GEM's ACC minus plain SGD's {_ci(gem)} pp ({ok})")
    return [*lines, ""]


def _tables(runs: list[Run], study) -> list[str]:
    labels = [v for phase, _ in study.phases for v in phase]
    lines = ["## Every variant", ""]
    for benchmark in study.benchmarks:
        sgd_steps = _by_seed(runs, benchmark, "sgd", "step_time_median")
        lines += [
            f"### {BENCH_LABELS.get(benchmark, benchmark)}",
            "",
            (
                "ACC, BWT, FWT and the learning accuracy (mean of the diagonal) in %, mean "
                "over seeds [95% t interval]; step: the median training time of a step "
                "(compilation excluded), and its ratio to plain SGD on the same seed (median "
                "[min, max])."
            ),
            "",
            "| variant | seeds | ACC | BWT | FWT | learning acc | step (ms) | × SGD |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in labels:
            cells = {k: _by_seed(runs, benchmark, label, k) for k in ("acc", "bwt", "fwt")}
            learn = _by_seed(runs, benchmark, label, "learning_acc")
            steps = _by_seed(runs, benchmark, label, "step_time_median")
            ratios = [steps[s] / sgd_steps[s] for s in steps if s in sgd_steps]
            ratio = (
                "—"
                if not ratios
                else f"{statistics.median(ratios):.1f} [{min(ratios):.1f}, {max(ratios):.1f}]"
            )
            step = "—" if not steps else f"{1000 * statistics.median(steps.values()):.2f}"
            lines.append(
                f"| {LABELS.get(label, label)} | {len(cells['acc'])} | "
                + " | ".join(_mean_ci(list(c.values())) for c in cells.values())
                + f" | {_mean_ci(list(learn.values()))} | {step} | {ratio} |"
            )
        lines += ["", f"![accuracy matrices](accuracy_matrices_{benchmark}.png)", ""]
    return lines


def heat_maps(out: Path, runs: list[Run], study) -> list[Path]:
    """One PNG per benchmark: every variant's seed-mean accuracy matrix R[i, j] (test
    accuracy on task j after training task i)."""
    plt = pyplot()
    labels = [v for phase, _ in study.phases for v in phase]
    paths = []
    for benchmark in study.benchmarks:
        present = [v for v in labels if _by_seed(runs, benchmark, v, "acc")]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(3.1 * len(present), 3.4), squeeze=False)
        for i, (ax, label) in enumerate(zip(axes[0], present)):
            mats = [
                np.asarray(r.summary["matrix"])
                for r in runs
                if r.benchmark == benchmark and r.label == label
            ]
            mean = np.mean(mats, axis=0)
            image = ax.imshow(mean, vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"{LABELS.get(label, label)}\n({len(mats)} seeds)", fontsize=8)
            ticks = [0, *range(4, len(mean), 5)]  # tasks numbered from 1
            ax.set_xticks(ticks, [t + 1 for t in ticks])
            ax.set_yticks(ticks, [t + 1 for t in ticks])
            ax.set_xlabel("test task", fontsize=7)
            if i == 0:
                ax.set_ylabel("after training task", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="accuracy")
        fig.suptitle(f"{BENCH_LABELS.get(benchmark, benchmark)}: accuracy matrices", fontsize=9)
        path = Path(out) / f"accuracy_matrices_{benchmark}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def build_report(out: Path, study) -> Path:
    """Writes ``out/RESULTS.md`` and the heat maps from the finished runs; returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out)
    total = len(study.cells())
    commits = sorted({str(r.info.get("commit")) for r in runs if r.info})
    machines = sorted({r.info["machine"] for r in runs if r.info.get("machine")})
    dirty = sum(1 for r in runs if r.info and not r.info.get("clean_tree", False))
    lines = [
        f"# Study {study.name}: layerwise gradient decomposition against A-GEM and GEM",
        "",
        f"{study.description}",
        "",
        f"Paper: {study.paper_setting}. Runs finished: {len(runs)} of {total}. "
        f"Commit(s): {', '.join(commits) or '—'}"
        + (f" ({dirty} run(s) from a checkout with uncommitted changes)" if dirty else "")
        + f". Machine(s): {'; '.join(machines) or '—'}. Built by "
        "`python -m experiments.studies.continual_mnist --report-only`.",
        "",
        *_endpoint(runs, study),
        *_sanity(runs, study),
        *_tables(runs, study),
        "## Pre-registration (written before the runs)",
        "",
        study.preregistration,
        "",
        f"Expected time: {study.expected_time}.",
        "",
    ]
    heat_maps(out, runs, study)
    write_results(out, lines)
    return out / "RESULTS.md"
