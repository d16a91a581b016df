"""Run the pre-registered forward-gradient study on CIFAR-10 (``forward_cifar10.toml``) in
chunks.

Usage::

    python -m experiments.studies.forward_cifar10 --list              # the grid, what is done
    python -m experiments.studies.forward_cifar10 --phase 0 --max-runs 3 \\
        --data-dir ../shared/data                                      # 3 tuning runs
    python -m experiments.studies.forward_cifar10 --report-only       # RESULTS.md from the runs

Every run is one ``gcgd-train`` process (``python -m gcgd_jax.train.cli``): first the
learning-rate tuning on a validation split (phase 0), then the grid at each variant's
chosen rate. The study is sized for the lent GPU machine: ``experiments/gpu_study.sh
forward_cifar10`` runs a chunk there within the lease (``--deadline``: a run cut by it
resumes from its last epoch checkpoint in the next chunk) and brings the runs back as a
tarball. The chunk runner is :mod:`experiments.studies.study`; after a chunk the report
is rebuilt (:mod:`experiments.studies.forward_cifar10_report`; ``--no-report`` skips it).
A run stopped by a non-finite loss (exit 3) is a result here (a diverged learning rate),
not a failure.
"""

from __future__ import annotations

import sys

from experiments import RESULTS, ROOT
from experiments.studies.study import Runner, Script
from gcgd_jax.train.cli import EXIT_NONFINITE, EXIT_OK

SCRIPT = Script(
    prog="python -m experiments.studies.forward_cifar10",
    description="The pre-registered forward-gradient study on CIFAR-10, run in resumable chunks.",
    study_path=ROOT / "studies" / "forward_cifar10.toml",
    default_out=RESULTS / "forward_cifar10",
    runner=Runner(cli="gcgd_jax.train.cli", benchmark_key="data.name", quiet=("--no-progress",)),
    report="experiments.studies.forward_cifar10_report:build_report",
    ok_exit_codes=(EXIT_OK, EXIT_NONFINITE),
)
OUT, RUNNER = SCRIPT.default_out, SCRIPT.runner
load_study, main = SCRIPT.load_study, SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
