"""The report of the gradient-guess training study (``guess_mnist.toml``): ``RESULTS.md`` with
the pre-registered endpoint first (six paired comparisons of final test accuracy), then the
sanity check, every variant (learning rate, per-step cost), the three guess families
against each other, the learning-rate tuning and the test-accuracy and training-loss curves
(PNG).

Built from the runs' ``metrics.jsonl`` and ``run.json`` only
(``python -m experiments.studies.guess_mnist --report-only``); the shared pieces are
:mod:`experiments.studies.study_report`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.studies.study import Study
from experiments.studies.study_report import (
    ACCURACY,
    Run,
    compare,
    endpoint_row,
    finals,
    grid_labels,
    holm_p,
    loads,
    pairs_table,
    plot_curves,
    tuning_section,
    variant_table,
    verdict_above,
    verdict_below,
    write_report,
)
from experiments.suites.stats import PairedComparison

LABELS = {
    "bp": "BP",
    "directional": "directional descent",
    "activation": "activation perturbation",
    "transpose": "Wᵀ",
    "mixing": "activation mixing",
}
FAMILIES = ("activation", "transpose", "mixing")  # the structured guesses
# the endpoint: (part, reference, criterion, verdict) for each family minus the reference
PARTS = (
    ("a", "directional", "lower end > 0", verdict_above),
    ("b", "bp", "upper end < 0", verdict_below),
)
SANITY_BP_ACCURACY = 97.0  # %: BP's mean final test accuracy must be above it (pre-registered)


def _endpoint(runs: list[Run], study: Study, benchmark: str) -> list[str]:
    seeds = len(study.phases[0][1])
    comparisons: dict[str, PairedComparison | None] = {}
    rows = []
    for part, ref, criterion, verdict in PARTS:
        for f in FAMILIES:
            c = comparisons[f"{part} {f}"] = compare(runs, benchmark, f, ref, ACCURACY)
            name = f"({part}) {LABELS[f]} − {LABELS[ref]}"
            rows.append((f"{part} {f}", name, c, criterion, verdict(c, seeds)))
    p = holm_p(comparisons)
    broken = _broken(runs, benchmark)
    return [
        "## Endpoint (pre-registered)",
        "",
        (
            "Final test accuracy differences in percentage points (higher is better): mean "
            'paired difference over seeds [95% Student-t interval]; (a) "structured guesses '
            'train better than random directions", (b) "guessing stays below backprop"; '
            "p: paired t-test, Holm over the six (beside, not criteria)."
        ),
        "",
        "| comparison | seeds | Δ test accuracy (pp) | criterion | verdict | p (Holm) |",
        "|---|---|---|---|---|---|",
        *(endpoint_row(name, c, crit, verdict, p[key]) for key, name, c, crit, verdict in rows),
        "",
        *(["Flag: the sanity check below FAILED: the protocol is broken.", ""] * broken),
    ]


def _bp_mean(runs: list[Run], benchmark: str) -> tuple[float, int] | None:
    """BP's mean final test accuracy (%) and its number of seeds; None before any."""
    bp = list(finals(runs, benchmark, "bp", ACCURACY).values())
    return (float(np.mean(bp)), len(bp)) if bp else None


def _broken(runs: list[Run], benchmark: str) -> bool:
    """Whether the sanity check failed: the protocol is broken."""
    found = _bp_mean(runs, benchmark)
    return found is not None and found[0] <= SANITY_BP_ACCURACY


def _sanity(runs: list[Run], benchmark: str) -> list[str]:
    if (found := _bp_mean(runs, benchmark)) is None:
        return ["## Sanity check", "", "BP has no finished run yet.", ""]
    verdict = "FAILED: the protocol is broken" if _broken(runs, benchmark) else "passed"
    return [
        "## Sanity check",
        "",
        (
            f"BP's mean final test accuracy: {found[0]:.2f}% over {found[1]} seeds (criterion: "
            f"above {SANITY_BP_ACCURACY:g}%): {verdict}."
        ),
        "",
    ]


def _variants(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    table = variant_table(
        runs, study, out, benchmark, metric=ACCURACY, names=LABELS, reference="bp",
        flag_grid_end=True,
    )  # fmt: skip
    found = loads(out)
    load = "—" if not found else f"{found[0]:.2f} to {found[-1]:.2f}"
    pairs = [(a, b) for i, a in enumerate(FAMILIES) for b in FAMILIES[i + 1 :]]
    seeds = len(study.phases[0][1])
    return [
        "## Every variant",
        "",
        (
            "Final test accuracy (%): mean over seeds [95% Student-t interval]; the learning "
            "rate chosen on the validation split (flagged when it is the smallest or largest of "
            "the tuning grid, which is not widened); the median step time as a ratio to BP's on "
            "the same seed (median [range] over seeds; the machine's 1-minute load average "
            f"when the grid runs ended: {load})."
        ),
        "",
        *table,
        "",
        (
            "Secondary (c), descriptive: the structured guess families against each other "
            "(paired, pp of test accuracy):"
        ),
        "",
        *pairs_table(runs, benchmark, pairs, metric=ACCURACY, names=LABELS, seeds=seeds),
        "",
    ]


def _curves(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    lines = []
    for stem, curve, heading, ylabel, log in (
        ("test_acc", lambda r: r.accuracies, "Test accuracy", "test accuracy (%)", False),
        ("train_loss", lambda r: r.train_loss, "Training loss", "training loss", True),
    ):
        file = f"{stem}_{benchmark}.png"
        title = f"{benchmark}: {heading.lower()} per epoch (seed mean, 95% band)"
        drawn = plot_curves(
            runs, grid_labels(study), benchmark, out / file, curve=curve, names=LABELS,
            ylabel=ylabel, title=title, log=log,
        )  # fmt: skip
        if drawn:
            lines += [f"## {heading} per epoch", "", f"![{heading.lower()} per epoch]({file})", ""]
    return lines


def _sections(out: Path, study: Study, runs: list[Run], benchmark: str) -> list[str]:
    return [
        *_endpoint(runs, study, benchmark),
        *_sanity(runs, benchmark),
        *_variants(runs, study, out, benchmark),
        *tuning_section(study, out, benchmark, LABELS),
        *_curves(runs, study, out, benchmark),
    ]


def build_report(out: Path, study: Study) -> Path:
    """Writes ``out/RESULTS.md`` (and its plots) from the finished runs; returns its path."""
    title = "gradient guesses against directional descent and backprop on MNIST"
    return write_report(out, study, title, _sections)
