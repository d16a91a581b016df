"""The reports as a whole: every suite's ``--report-only`` rebuilds its committed
``RESULTS.md`` byte for byte, the report modules do not import the runner (the runner
imports them), and ``metrics.jsonl`` has one parser."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import RESULTS
from experiments.suites import compare

ROOT = Path(__file__).resolve().parents[2]
REPORT_MODULES = ("report", "long_report", "plots", "stats")
COMMITTED = sorted(name for name in compare.suites() if (RESULTS / name / "RESULTS.md").exists())


def _imported(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any depth (functions and
    ``if TYPE_CHECKING:`` blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_report_modules_do_not_import_the_runner():
    for name in REPORT_MODULES:
        path = ROOT / "experiments" / "suites" / f"{name}.py"
        assert "experiments.suites.compare" not in _imported(path), path
    # Nor does importing them load it, or do work (the plots import matplotlib when drawn).
    code = (
        "import sys, experiments.suites.report, experiments.suites.long_report; "
        "print(*(m for m in ('experiments.suites.compare', 'matplotlib', 'jax') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == []


def test_metrics_files_have_one_parser():
    """``gcgd_jax.train.report.read_metrics`` is the one function of that name."""
    defined = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in ("gcgd_jax", "experiments")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "read_metrics"
    ]
    assert len(defined) == 1 and defined[0].startswith("gcgd_jax/train/report.py:"), defined


@pytest.mark.parametrize("name", COMMITTED)
def test_report_only_rebuilds_the_committed_report(name, tmp_path):
    """The runner's ``--report-only`` on the committed runs, into a scratch results folder
    (the runs, the step costs, the discussion and the sibling folders the report links to are
    the committed ones): the same ``RESULTS.md``, byte for byte, and the same plots (by name:
    a PNG's bytes depend on the matplotlib and FreeType versions)."""
    committed = RESULTS / name
    results = tmp_path / "results"
    out = results / name
    out.mkdir(parents=True)
    for entry in committed.iterdir():
        if entry.name != "RESULTS.md" and entry.suffix != ".png":
            (out / entry.name).symlink_to(entry)
    for entry in RESULTS.iterdir():
        if entry.name != name:
            (results / entry.name).symlink_to(entry)
    assert compare.main(["--suite", name, "--out", str(out), "--report-only"]) == 0
    assert (out / "RESULTS.md").read_bytes() == (committed / "RESULTS.md").read_bytes()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        p.name for p in committed.glob("*.png")
    )


def test_every_suite_with_committed_results_is_rebuilt():
    assert {"cpu-fmnist", "cpu-cifar10", "cpu-cifar10-long"} <= set(COMMITTED)
