"""The suites' plots: seed-averaged curves with bootstrap bands, and one way to finish a figure.

Both reports (:mod:`experiments.suites.report`, :mod:`experiments.suites.long_report`)
draw with these, so every suite's figures share their look: the mean over seeds with a
95% percentile-bootstrap band of that mean, a light grid, PNG at 110 dpi.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.suites.stats import bootstrap_mean_ci


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_with_band(ax: Any, curves: np.ndarray, *, color: Any, label: str, **style: Any) -> None:
    """Plots the mean of ``curves`` (seeds x epochs, in the plotted unit) against epochs
    1..n, and, with two seeds or more, the 95% bootstrap band of that mean per epoch."""
    curves = np.asarray(curves, dtype=float)
    x = np.arange(1, curves.shape[1] + 1)
    ax.plot(x, curves.mean(0), color=color, label=label, **style)
    if len(curves) > 1:
        band = np.array([bootstrap_mean_ci(curves[:, j], n_boot=1000)[1:] for j in x - 1])
        ax.fill_between(x, band[:, 0], band[:, 1], color=color, alpha=0.12)


def finish(
    fig: Any,
    ax: Any,
    path: Path,
    *,
    xlabel: str | None = None,
    ylabel: str,
    title: str,
    legend_size: float | None = 8,
    legend_cols: int = 1,
    grid: bool = True,
) -> None:
    """Labels, legend (``legend_size=None``: none), grid; writes ``path`` and closes ``fig``."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend_size is not None:
        ax.legend(fontsize=legend_size, ncol=legend_cols)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
