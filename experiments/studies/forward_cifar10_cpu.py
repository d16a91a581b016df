"""Run the pre-registered CIFAR-10 forward-gradient study at the CPU's budget
(``forward_cifar10_cpu.toml``: 500 steps on a 10,000-image subset) in chunks.

Usage::

    python -m experiments.studies.forward_cifar10_cpu --list             # the grid, what is done
    python -m experiments.studies.forward_cifar10_cpu --phase 0 --max-runs 2 \\
        --data-dir ../shared/data                                         # 2 tuning runs
    python -m experiments.studies.forward_cifar10_cpu --report-only      # RESULTS.md from the runs

The same variants, rules and report (:mod:`experiments.studies.forward_cifar10_report`) as
the GPU's study (:mod:`experiments.studies.forward_cifar10`, 25 epochs of the full set);
only the data and the budget differ. Every run is one ``gcgd-train`` process, 12-33 min on
the 2-core CPU, so a chunk of a few runs fits beside other work at ``nice 19``; a run cut
by the session's end resumes from its last epoch checkpoint. A run stopped by a non-finite
loss (exit 3) is a result here (a diverged learning rate), not a failure.
"""

from __future__ import annotations

import sys

from experiments import RESULTS, ROOT
from experiments.studies.study import Runner, Script
from gcgd_jax.train.cli import EXIT_NONFINITE, EXIT_OK

SCRIPT = Script(
    prog="python -m experiments.studies.forward_cifar10_cpu",
    description="The pre-registered CIFAR-10 forward-gradient study at the CPU's budget, in chunks.",
    study_path=ROOT / "studies" / "forward_cifar10_cpu.toml",
    default_out=RESULTS / "forward_cifar10_cpu",
    runner=Runner(cli="gcgd_jax.train.cli", benchmark_key="data.name", quiet=("--no-progress",)),
    report="experiments.studies.forward_cifar10_report:build_report",
    ok_exit_codes=(EXIT_OK, EXIT_NONFINITE),
)
OUT, RUNNER = SCRIPT.default_out, SCRIPT.runner
load_study, main = SCRIPT.load_study, SCRIPT.main

if __name__ == "__main__":
    sys.exit(main())
