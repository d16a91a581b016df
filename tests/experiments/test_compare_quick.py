"""`python -m experiments.suites.compare --suite cpu-fmnist --quick` runs end to end.

This is the CI smoke test of the comparison runner: 3 methods x 2 budgets x 1 seed on a
few hundred Fashion-MNIST images of the shared data folder (``../shared/data`` or
``$GCGD_SHARED_DATA``). The runner prints which data it read, and the test checks it
was that real data. Where the folder is missing a synthetic 28x28x1 set stands in (so
the runner is exercised on every machine), except with ``CI=true``, where a missing
folder fails the test. It checks the grid is complete, the report and plots are written,
and a second invocation re-runs nothing (resume). Numbers are meaningless at this size.
"""

from __future__ import annotations

import json

import pytest

from experiments.suites import compare
from experiments.suites.report import load_runs
from tests.conftest import find_shared_data, in_ci

SYNTHETIC = ["--set", "data.name=synthetic", "--set", "data.synthetic_image_shape=[28, 28, 1]"]


@pytest.mark.slow
def test_quick_suite_runs_end_to_end_and_resumes(tmp_path, capsys):
    shared = find_shared_data()
    if shared is None and in_ci():
        pytest.fail("CI=true but the shared data folder is missing (set GCGD_SHARED_DATA)")
    argv = ["--suite", "cpu-fmnist", "--quick", "--out", str(tmp_path)]
    argv += [] if shared is not None else SYNTHETIC
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    (data_line,) = [line for line in out.splitlines() if line.startswith("data: ")]
    if shared is not None:  # the real data, not the bundled sample nor a synthetic set
        idx = shared / "fashion-mnist" / "train-images-idx3-ubyte.gz"
        assert data_line.startswith(f"data: fashion_mnist, IDX files {idx} "), data_line
    else:
        assert data_line.startswith("data: synthetic"), data_line

    suite = compare.quick(compare.suites()["cpu-fmnist"])
    runs = load_runs(tmp_path)
    assert sorted((r.method, r.budget, r.seed) for r in runs) == sorted(suite.grid())
    for r in runs:
        info = json.loads(
            (
                tmp_path / "runs" / r.method / f"b{r.budget:g}" / f"s{r.seed}" / "run.json"
            ).read_text()
        )
        assert info["exit_code"] == 0 and info["peak_rss_mib"] > 0
        assert 0.0 <= r.final_acc <= 1.0
    # The budget scales the number of steps: 50% runs take half the steps.
    steps = {(r.method, r.budget): r.summary["step"] for r in runs}
    for m in suite.phases[0].methods:
        assert steps[(m, 0.5)] * 2 == pytest.approx(steps[(m, 1.0)], abs=1)

    results = (tmp_path / "RESULTS.md").read_text()
    assert "Final test accuracy" in results and "Budget sweep" in results
    for png in ("accuracy_vs_epoch.png", "budget_sweep.png", "overhead.png"):
        assert (tmp_path / png).stat().st_size > 0

    # Resume: everything is complete, so nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/*/metrics.jsonl")}
    assert compare.main(argv) == 0
    assert "budget=" not in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/*/*/metrics.jsonl")}


def test_seed_parallel_groups_cells_by_method_and_budget():
    cells = [("baseline", 1.0, 0), ("gc_ode_scale_only", 1.0, 0), ("baseline", 1.0, 1)]
    cells += [("baseline", 0.5, 0), ("gc_ode_scale_only", 1.0, 1)]
    groups = compare._batches(cells, seed_parallel=True)
    assert groups == [
        [("baseline", 1.0, 0), ("baseline", 1.0, 1)],
        [("gc_ode_scale_only", 1.0, 0)],  # its control scale is per seed: one by one
        [("baseline", 0.5, 0)],
        [("gc_ode_scale_only", 1.0, 1)],
    ]
    assert compare._batches(cells, seed_parallel=False) == [[c] for c in cells]


@pytest.mark.slow
def test_quick_suite_with_seed_parallel_groups(tmp_path, capsys):
    argv = ["--suite", "cpu-fmnist", "--quick", "--out", str(tmp_path), "--methods", "baseline"]
    argv += ["--seeds", "2", "--seed-parallel", *SYNTHETIC]
    argv += ["--set", "run.replica_strategy=vmap"]
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("seed(s) [0, 1]") == 2  # one process per budget
    runs = load_runs(tmp_path)
    assert sorted((r.method, r.budget, r.seed) for r in runs) == [
        ("baseline", 0.5, 0), ("baseline", 0.5, 1), ("baseline", 1.0, 0), ("baseline", 1.0, 1)
    ]  # fmt: skip
    for r in runs:
        folder = tmp_path / "runs" / "baseline" / f"b{r.budget:g}" / f"s{r.seed}"
        info = json.loads((folder / "run.json").read_text())
        assert info["exit_code"] == 0 and "seed-parallel group of seeds 0, 1" in info["note"]
        assert "run.seeds=[0, 1]" in info["command"]
    assert compare.main(argv) == 0  # finished: nothing runs again
    assert "seed(s)" not in capsys.readouterr().out
