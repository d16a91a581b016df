"""The report of the CIFAR-10 forward-gradient studies (``forward_cifar10.toml``, the GPU's,
and ``forward_cifar10_cpu.toml``, the CPU's budget; the same endpoint):
``RESULTS.md`` with the pre-registered endpoint first, then the sanity check, every variant
against the paper, the learning-rate tuning, the per-step costs, where BP's test error was
lowest and the test-error curves (PNG).

Built from the runs' ``metrics.jsonl`` and ``run.json`` only
(``python -m experiments.studies.forward_cifar10 --report-only``); the shared pieces are
:mod:`experiments.studies.study_report`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.studies.study import Study
from experiments.studies.study_report import (
    ERROR,
    Run,
    compare,
    endpoint_row,
    error_curves,
    error_sanity,
    holm_p,
    incomplete,
    tuning_section,
    variant_table,
    verdict_below,
    write_report,
)
from experiments.suites.stats import PairedComparison

LABELS = {"bp": "BP", "fg_a": "FG-A", "lg_fg_a": "LG-FG-A"}
# Ren et al., Table 3, CIFAR-10 M/8/16 test error (%), 200 epochs
PAPER = {"bp": 33.62, "fg_a": 59.72, "lg_fg_a": 30.68}
SANITY_BP_ERROR = 45.0  # %: BP's mean test error must be below it (pre-registered)
MARGIN_PP = 1.0  # (b): "no worse than BP by more than 1 pp"


def verdict_noninferior(c: PairedComparison | None, seeds: int, margin: float = MARGIN_PP) -> str:
    """(b): supported when the interval's upper end is below ``margin``, contradicted when
    its lower end is above it, inconclusive otherwise."""
    if (msg := incomplete(c, seeds)) is not None:
        return msg
    if c.t_high < margin:
        return "supported"
    return "contradicted" if c.t_low > margin else "inconclusive"


def _endpoint(runs: list[Run], study: Study, benchmark: str) -> list[str]:
    seeds = len(study.phases[0][1])
    a = compare(runs, benchmark, "lg_fg_a", "fg_a", ERROR)
    b = compare(runs, benchmark, "lg_fg_a", "bp", ERROR)
    p = holm_p({"a": a, "b": b})
    below = f"upper end < +{MARGIN_PP:g}"
    return [
        "## Endpoint (pre-registered)",
        "",
        (
            "Final test error differences in percentage points (lower is better): mean paired "
            "difference over seeds [95% Student-t interval]; p: paired t-test, Holm over the two "
            "(beside, not criteria)."
        ),
        "",
        "| comparison | seeds | Δ test error (pp) | criterion | verdict | p (Holm) |",
        "|---|---|---|---|---|---|",
        endpoint_row("(a) LG-FG-A − FG-A", a, "upper end < 0", verdict_below(a, seeds), p["a"]),
        endpoint_row("(b) LG-FG-A − BP", b, below, verdict_noninferior(b, seeds), p["b"]),
        "",
    ]


def _setting(study: Study, key: str) -> str | None:
    """The value the study's base overrides give ``key`` (None when they do not set it)."""
    found = [o.partition("=")[2] for o in study.base if o.partition("=")[0] == key]
    return found[-1] if found else None


def _subset(study: Study) -> str:
    subset = _setting(study, "data.train_subset")
    return "" if subset is None else f" of a {int(subset):,}-image training subset"


def _best_epochs(runs: list[Run], benchmark: str) -> list[str]:
    """Secondary (e): the epoch of BP's lowest test error, per seed."""
    bp = sorted((r for r in runs if r.benchmark == benchmark and r.label == "bp"),
                key=lambda r: r.seed)  # fmt: skip
    if not bp:
        return []
    cells = [
        f"s{r.seed}: epoch {int(np.argmin(r.errors)) + 1} of {len(r.errors)} "
        f"({min(r.errors):.2f}% vs {r.errors[-1]:.2f}% at the end)"
        for r in bp
    ]
    return ["Secondary (e): BP's lowest test error: " + "; ".join(cells) + ".", ""]


def _variants(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    table = variant_table(
        runs, study, out, benchmark, metric=ERROR, names=LABELS, reference="bp", paper=PAPER,
        flag_grid_end=True,
    )  # fmt: skip
    return [
        "## Every variant",
        "",
        (
            "Final test error (%): mean over seeds [95% Student-t interval]; the paper's Table 3 "
            f"(200 epochs; this study trains {_setting(study, 'train.epochs')} epochs"
            f"{_subset(study)}); the learning rate chosen on the validation "
            "split; the median step time as a ratio to BP's on the same seed (median [range] "
            "over seeds; the machines are in the header)."
        ),
        "",
        *table,
        "",
        *_best_epochs(runs, benchmark),
    ]


def _sections(out: Path, study: Study, runs: list[Run], benchmark: str) -> list[str]:
    return [
        *_endpoint(runs, study, benchmark),
        *error_sanity(runs, study, benchmark, SANITY_BP_ERROR),
        *_variants(runs, study, out, benchmark),
        *tuning_section(study, out, benchmark, LABELS),
        *error_curves(runs, study, out, benchmark, LABELS, log=False),
    ]


def build_report(out: Path, study: Study) -> Path:
    """Writes ``out/RESULTS.md`` (and its plot) from the finished runs; returns its path."""
    title = "forward gradients with local losses on CIFAR-10 (M/8/16)"
    return write_report(out, study, title, _sections)
