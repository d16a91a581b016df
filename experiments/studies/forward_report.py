"""The report of the forward-gradient study (``forward_mnist.toml``): ``RESULTS.md`` with the
pre-registered endpoint first, then the sanity check, every variant against the paper,
the learning-rate tuning, the per-step costs and the test-error curves (PNG).

Built from the runs' ``metrics.jsonl`` and ``run.json`` only
(``python -m experiments.studies.forward_mnist --report-only``); the shared pieces are
:mod:`experiments.studies.study_report`.
"""

from __future__ import annotations

from pathlib import Path

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
    pairs_table,
    tuning_section,
    variant_table,
    verdict_below,
    write_report,
)
from experiments.suites.stats import PairedComparison

__all__ = ["build_report", "verdict_below", "verdict_within"]

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


def verdict_within(c: PairedComparison | None, seeds: int, margin: float = EQUIVALENCE_PP) -> str:
    """(b): supported inside [-margin, margin], contradicted entirely outside it."""
    if (msg := incomplete(c, seeds)) is not None:
        return msg
    if -margin <= c.t_low and c.t_high <= margin:
        return "supported"
    if c.t_low > margin or c.t_high < -margin:
        return "contradicted"
    return "inconclusive"


def _endpoint(runs: list[Run], study: Study, benchmark: str) -> list[str]:
    seeds = len(study.phases[0][1])
    a = compare(runs, benchmark, "fg_a", "fg_w", ERROR)
    b = compare(runs, benchmark, "lg_fg_a", "bp", ERROR)
    p = holm_p({"a": a, "b": b})
    within = f"within ±{EQUIVALENCE_PP:g} pp"
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
        endpoint_row("(a) FG-A − FG-W", a, "upper end < 0", verdict_below(a, seeds), p["a"]),
        endpoint_row("(b) LG-FG-A − BP", b, within, verdict_within(b, seeds), p["b"]),
        "",
    ]


def _variants(runs: list[Run], study: Study, out: Path, benchmark: str) -> list[str]:
    table = variant_table(
        runs, study, out, benchmark, metric=ERROR, names=LABELS, reference="bp", paper=PAPER
    )
    pairs = (("lg_fg_w", "fg_w"), ("lg_fg_a", "fg_a"), ("lg_bp", "bp"))
    seeds = len(study.phases[0][1])
    return [
        "## Every variant",
        "",
        (
            "Final test error (%): mean over seeds [95% Student-t interval]; the paper's Table 3 "
            "(200 epochs); the learning rate chosen on the validation split; the median step time "
            "as a ratio to BP's on the same seed (median [range] over seeds)."
        ),
        "",
        *table,
        "",
        "Secondary, descriptive (paired, pp of test error):",
        "",
        *pairs_table(runs, benchmark, pairs, metric=ERROR, names=LABELS, seeds=seeds),
        "",
    ]


def _sections(out: Path, study: Study, runs: list[Run], benchmark: str) -> list[str]:
    return [
        *_endpoint(runs, study, benchmark),
        *error_sanity(runs, study, benchmark, SANITY_BP_ERROR),
        *_variants(runs, study, out, benchmark),
        *tuning_section(study, out, benchmark, LABELS),
        *error_curves(runs, study, out, benchmark, LABELS, log=True),
    ]


def build_report(out: Path, study: Study) -> Path:
    """Writes ``out/RESULTS.md`` (and its plot) from the finished runs; returns its path."""
    return write_report(out, study, "forward gradients with local losses on MNIST", _sections)
