"""Run the pre-registered gradient-guess training study (``guess_mnist.toml``) in chunks.

Usage::

    python -m experiments.studies.guess_mnist --list                   # the grid, what is done
    python -m experiments.studies.guess_mnist --phase 0 --max-runs 8 \\
        --data-dir ../shared/data/mnist                                 # 8 tuning runs
    python -m experiments.studies.guess_mnist --report-only            # RESULTS.md from the runs

Singhal et al.'s training question (issue #37): backprop, directional descent and the three
structured guess families train the same ReLU MLP for the same number of steps. Every run is
one ``gcgd-train`` process (``python -m gcgd_jax.train.cli``): first the learning-rate tuning
on a validation split (phase 0), then the grid at each variant's chosen rate. The chunk
runner is :mod:`experiments.studies.study`; the report is
:mod:`experiments.studies.guess_report`. A run stopped by a non-finite loss (exit 3) is a
result here (a diverged learning rate), not a failure.
"""

from __future__ import annotations

import sys

from experiments import RESULTS, ROOT
from experiments.studies.study import Runner, Script
from gcgd_jax.train.cli import EXIT_NONFINITE, EXIT_OK

SCRIPT = Script(
    prog="python -m experiments.studies.guess_mnist",
    description="The pre-registered gradient-guess training study, run in resumable chunks.",
    study_path=ROOT / "studies" / "guess_mnist.toml",
    default_out=RESULTS / "guess_mnist",
    runner=Runner(cli="gcgd_jax.train.cli", benchmark_key="data.name", quiet=("--no-progress",)),
    report="experiments.studies.guess_report:build_report",
    ok_exit_codes=(EXIT_OK, EXIT_NONFINITE),
)
OUT, RUNNER = SCRIPT.default_out, SCRIPT.runner
load_study, main = SCRIPT.load_study, SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
