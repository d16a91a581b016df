"""Run the pre-registered continual-learning study (``continual_mnist.toml``) in chunks.

Usage::

    python -m experiments.studies.continual_mnist --list           # the grid and what is done
    python -m experiments.studies.continual_mnist --max-runs 4     # the next 4 unfinished runs
    python -m experiments.studies.continual_mnist --phase 1        # phase 1 only, to the end
    python -m experiments.studies.continual_mnist --report-only    # RESULTS.md from the runs

Every run is one ``gcgd-continual`` process (``python -m gcgd_jax.continual.cli``) writing
into ``experiments/results/continual_mnist/runs/<benchmark>/<label>/s<seed>/``; an
interrupted one is resumed from the checkpoint after its last finished task. The chunk
runner is :mod:`experiments.studies.study`; after a chunk the report is rebuilt
(:mod:`experiments.studies.continual_report`).
"""

from __future__ import annotations

import sys

from experiments import RESULTS, ROOT
from experiments.studies.study import Runner, Script

SCRIPT = Script(
    prog="python -m experiments.studies.continual_mnist",
    description="The pre-registered continual-learning study, run in resumable chunks.",
    study_path=ROOT / "studies" / "continual_mnist.toml",
    default_out=RESULTS / "continual_mnist",
    runner=Runner(cli="gcgd_jax.continual.cli", benchmark_key="tasks.benchmark"),
    report="experiments.studies.continual_report:build_report",
)
OUT, RUNNER = SCRIPT.default_out, SCRIPT.runner
load_study, main = SCRIPT.load_study, SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
