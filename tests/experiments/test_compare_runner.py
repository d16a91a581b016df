"""The comparison runner on a tiny suite: it resumes an interrupted run, stops after
--max-runs new runs, exits 1 when a run fails, and --report-only runs nothing.

The suite's base configuration is a ResNet-20 on 8x8 synthetic images (2 epochs of
4 steps); each run is a real ``python -m gcgd_jax.train`` process, as in a suite.
"""

from __future__ import annotations

import json

import pytest

from experiments.suites import compare
from gcgd_jax.train import Trainer, load_config
from gcgd_jax.train.report import read_metrics

BASE = """
[run]
name = "tiny"
[data]
name = "synthetic"
synthetic_image_shape = [8, 8, 3]
synthetic_train_size = 32
synthetic_test_size = 16
batch_size = 8
[optim]
lr = 0.05
[train]
epochs = 2
"""


@pytest.fixture
def tiny_suite(tmp_path, monkeypatch):
    base = tmp_path / "tiny.toml"
    base.write_text(BASE)
    # A method whose runs fail at run time (its data folder does not exist).
    broken = ("data.name=mnist", f"data.data_dir={tmp_path / 'missing'}")
    monkeypatch.setitem(compare.METHODS, "broken", broken)
    suite = compare.Suite(
        name="tiny",
        base_config=str(base),
        description="A tiny suite for the runner's tests.",
        phases=(compare.Phase(("baseline", "broken", "gc_w"), (1.0,), (0,)),),
    )
    monkeypatch.setitem(compare.suites(), "tiny", suite)
    return suite


def _interrupt(suite, out, method, stop_at_step):
    """A run of the cell, as run_one configures it, killed after ``stop_at_step``."""
    overrides = [
        *suite.overrides_for(method),
        "run.seed=0",
        f"run.name={suite.name}/{method}/b1/s0",
        "train.budget=1.0",
        "log.progress=false",
    ]
    cfg = load_config(suite.base_config, overrides)
    directory = compare.run_dir(out, method, 1.0, 0)
    Trainer(cfg, out_dir=directory).run(stop_at_step=stop_at_step)
    return directory


@pytest.mark.slow
def test_resume_max_runs_failure_and_report_only(tiny_suite, tmp_path, capsys):
    out = tmp_path / "results"
    baseline = _interrupt(tiny_suite, out, "baseline", stop_at_step=5)  # checkpoint at step 4
    assert not compare.is_complete(baseline)

    # 2 new runs: the interrupted baseline (resumed) and the broken one; gc_w waits.
    assert compare.main(["--suite", "tiny", "--out", str(out), "--max-runs", "2"]) == 1
    captured = capsys.readouterr()
    assert "data: synthetic" in captured.out
    assert "[1/3] baseline" in captured.out and "[2/3] broken" in captured.out
    assert "[3/3]" not in captured.out
    assert "1 run(s) failed: [('broken', 1.0, 0)]" in captured.err
    assert not compare.run_dir(out, "gc_w", 1.0, 0).exists()

    assert compare.is_complete(baseline)
    assert "resumed from checkpoint at step 4" in (baseline / "train.log").read_text()
    summary = read_metrics(baseline / "metrics.jsonl")[-1]
    assert summary["resumed_from_step"] == 4 and summary["steps_run"] == 4
    assert summary["step"] == 8
    broken = compare.run_dir(out, "broken", 1.0, 0)
    assert json.loads((broken / "run.json").read_text())["exit_code"] == 2
    assert "gcgd-train: error: data: " in (broken / "train.log").read_text()

    # --report-only: the report from the complete run, nothing is run.
    stamp = (baseline / "metrics.jsonl").stat().st_mtime_ns
    assert compare.main(["--suite", "tiny", "--out", str(out), "--report-only"]) == 0
    captured = capsys.readouterr()
    assert "budget=" not in captured.out and "data: " not in captured.out
    assert (out / "RESULTS.md").is_file()
    assert (baseline / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert not compare.run_dir(out, "gc_w", 1.0, 0).exists()
    assert not compare.is_complete(broken)
