"""Experiments: the measurements behind every figure of the project (not part of the library).

Run everything from the repository root as a module, ``python -m experiments.<role>.<name>``:

- ``common/``: provenance (commit, clean tree, machine) and the bare train step;
- ``suites/``: the comparison suites (one TOML definition each), their runner, reports,
  statistics and the base learning-rate sweep;
- ``studies/``: focused studies (GC-W on controlled problems, gradient quality, GC-ODE's
  backward matching);
- ``bench/``: speed and memory benchmarks;
- ``tools/``: data preparation;
- ``gpu_check.sh`` / ``gpu_check.py``: the one-command check on a lent GPU machine.

Every script writes under ``results/<script name>/`` (suites: ``results/<suite>/``).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent  # experiments/
REPO = ROOT.parent  # the repository root
RESULTS = ROOT / "results"
