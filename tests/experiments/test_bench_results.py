"""The benchmarks' committed results stay readable: every committed record under
``experiments/results/`` rebuilds its committed table through its benchmark's report code,
the records the benchmarks write now keep the committed fields, and the suite reports read
every committed ``overhead.json``. (The timing itself is a benchmark, not a test.)"""

from __future__ import annotations

import importlib
import json
import os

import pytest

from experiments import RESULTS

# results folder -> (benchmark module, its markdown function); bench_methods writes
# overhead.json into a suite's folder (or another --out).
REPORTERS = {
    "bench_throughput": ("bench_throughput", "_markdown"),
    "bench_vs_torch": ("bench_vs_torch", "_markdown"),
    "bench_gc_ode": ("bench_gc_ode", "_markdown"),
    "bench_transforms": ("bench_transforms", "markdown"),
    "profile_step": ("profile_step", "_markdown"),
    "bench_seed_parallel": ("bench_seed_parallel", "_markdown"),
    "bench_estimators": ("bench_estimators", "markdown"),
}
COMMITTED = sorted(
    path
    for folder in REPORTERS
    for path in (RESULTS / folder).rglob("*.json")
    if path.name != "overhead.json" and path.with_suffix(".md").exists()
)
OVERHEAD = sorted(RESULTS.rglob("overhead.json"))


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    """Some benchmarks set the CPU flag when imported (``apply_cpu_flags``, before JAX
    starts); a test that imports one leaves this process's flags as they were."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def _reporter(path):
    if path.name == "overhead.json":
        return importlib.import_module("experiments.bench.bench_methods")._markdown
    module, function = REPORTERS[path.relative_to(RESULTS).parts[0]]
    return getattr(importlib.import_module(f"experiments.bench.{module}"), function)


def _tables(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_there_are_committed_records_to_check():
    folders = {p.relative_to(RESULTS).parts[0] for p in COMMITTED}
    assert folders == set(REPORTERS)
    assert len(OVERHEAD) >= 3


@pytest.mark.parametrize("path", COMMITTED + OVERHEAD, ids=lambda p: str(p.relative_to(RESULTS)))
def test_a_committed_record_rebuilds_its_committed_table(path):
    record = json.loads(path.read_text())
    rebuilt = _reporter(path)(record)
    committed = path.with_suffix(".md").read_text()
    assert _tables(rebuilt) and _tables(rebuilt) == _tables(committed)


@pytest.mark.parametrize("path", OVERHEAD, ids=lambda p: str(p.relative_to(RESULTS)))
def test_the_suite_reports_read_every_committed_overhead_file(path):
    from experiments.suites.report import clean_step_costs

    costs = clean_step_costs(path.parent)
    assert costs["baseline"]["ratio"] == pytest.approx(1.0)


def _fields(rows):
    """Every row's keys (rows: a dict of rows by name, or a list of rows)."""
    return {k for r in (rows.values() if isinstance(rows, dict) else rows) for k in r}


def test_the_step_cost_record_keeps_its_fields_and_ratio():
    from experiments.bench.bench_methods import step_costs

    costs = step_costs({"baseline": [0.2, 0.4, 0.3], "gcgd": [0.6, 0.3, 0.9]})
    assert costs["gcgd"]["ratio"] == pytest.approx(2.0) and costs["baseline"]["n"] == 3
    committed = json.loads((RESULTS / "cpu-fmnist" / "overhead.json").read_text())["methods"]
    assert _fields(committed) <= set(costs["gcgd"])


def test_the_seed_parallel_rows_keep_their_fields():
    from experiments.bench.bench_seed_parallel import _rows

    times = {(1, "single"): [0.2, 0.2], (2, "vmap"): [0.3, 0.3, 0.3]}
    rows = _rows(times, dict.fromkeys(times, 5.0), dict.fromkeys(times, 128))
    assert rows[1]["per_replica_s"] == pytest.approx(0.15)
    assert rows[1]["per_replica_vs_single"] == pytest.approx(0.75)
    assert rows[1]["samples"] == 3 and rows[1]["images_per_s"] == pytest.approx(256 / 0.3)
    committed = json.loads(
        (RESULTS / "bench_seed_parallel" / "bench_seed_parallel.json").read_text()
    )
    assert _fields(committed["rows"]) <= _fields(rows)


def test_the_gc_ode_summary_keeps_its_fields():
    from experiments.bench.bench_gc_ode import _summary

    out = _summary({"plain": [0.1, 0.3, 0.2], "gradient/euler/1": [0.3, 0.4]}, 128)
    assert out["gradient/euler/1"]["ratio_to_plain"] == pytest.approx(0.35 / 0.2)
    assert out["plain"]["img_per_s"] == pytest.approx(640)
    committed = json.loads((RESULTS / "bench_gc_ode" / "gc_ode_overhead.json").read_text())
    assert _fields(committed["train"]) == _fields(out)


def test_the_profile_step_summary_keeps_its_fields():
    from experiments.bench.profile_step import _step_summary

    out = _step_summary({"base": [0.2, 0.1, 0.3]}, {"base": [9.0, 7.0]})
    assert out["base"]["median_ms"] == pytest.approx(200) and out["base"]["first_step_s"] == 8.0
    committed = json.loads((RESULTS / "profile_step" / "profile.json").read_text())
    assert _fields(committed["step"]) == _fields(out)


def test_a_transform_update_is_timed_side_by_side_with_the_committed_fields():
    """``bench_update`` end to end on a tiny tree (one round, one call each)."""
    from experiments.bench import bench_transforms as bench

    out = bench.bench_update(
        {"conv": {"kernel": (3, 3, 2, 4)}},
        {"centralize": bench.TRANSFORMS["centralize"]},
        rounds=2,
        reps=1,
    )
    assert out["num_params"] == 72 and out["rows"]["sgd"]["ratio_to_sgd"] == 1.0
    assert out["rows"]["centralize"]["n"] == 2
    committed = json.loads((RESULTS / "bench_transforms" / "full.json").read_text())
    assert _fields(committed["update"]["resnet20_tree"]["rows"]) == _fields(out["rows"])


def test_gc_w_memory_rebuilds_its_committed_tables(tmp_path):
    """The counts are exact: the record written now gives the committed tables, and its
    JSON goes beside the markdown."""
    from experiments.bench import gc_w_memory

    gc_w_memory.main(["--out", str(tmp_path / "gc_w_memory.md")])
    record = json.loads((tmp_path / "gc_w_memory.json").read_text())
    assert record["command"] == (
        f"python -m experiments.bench.gc_w_memory --out {tmp_path / 'gc_w_memory.md'}"
    )
    assert {"date", "commit", "machine"} <= set(record)
    committed = (RESULTS / "gc_w_memory" / "gc_w_memory.md").read_text()
    assert _tables((tmp_path / "gc_w_memory.md").read_text()) == _tables(committed)
