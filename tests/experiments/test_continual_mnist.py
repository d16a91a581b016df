"""The pre-registered continual-learning study: its definition, its chunk runner and its
report (``experiments/studies/continual_mnist*.py``), on fake and tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.studies.continual_mnist import OUT, RUNNER, load_study, main
from experiments.studies.continual_report import build_report, load_runs
from experiments.studies.study import Cell, is_complete, run_dir
from gcgd_jax.continual.config import load_config
from gcgd_jax.continual.metrics import continual_metrics
from tests.continual.tiny import TINY_SETTINGS, write_tiny_mnist

PRIMARY = ["sgd", "agem", "gem", "layerwise_decomposition", "layerwise_decomposition_whole"]


def test_the_study_is_the_pre_registered_grid():
    study = load_study()
    cells = study.cells(1)
    assert {c.label for c in cells} == set(PRIMARY)
    assert {c.benchmark for c in cells} == {"permuted_mnist", "rotated_mnist"}
    assert {c.seed for c in cells} == set(range(5)) and len(cells) == 50
    assert cells[:5] == [Cell(1, "permuted_mnist", 0, v) for v in PRIMARY]  # seed-major blocks
    assert "Primary endpoint (pre-registered" in study.preregistration
    for label, overrides in study.variants.items():  # every variant is a valid run
        for benchmark in study.benchmarks:
            cfg = load_config(None, [*overrides, f"tasks.benchmark={benchmark}"])
            assert cfg.tasks.num_tasks == 20 and cfg.train.memory_size == 256, label
    cell = Cell(1, "rotated_mnist", 3, "gem")
    cmd = RUNNER.command(study, cell, OUT, run_dir("out", "rotated_mnist", "gem", 3))
    assert cmd[1:3] == ["-m", "gcgd_jax.continual.cli"] and "run.seed=3" in cmd
    assert "tasks.benchmark=rotated_mnist" in cmd


def _fake_run(out, benchmark, label, seed, rng):
    """A finished run's files, with a made-up accuracy matrix."""
    folder = run_dir(out, benchmark, label, seed)
    folder.mkdir(parents=True)
    t = 20
    boost = {"layerwise_decomposition": 0.2, "gem": 0.1, "agem": 0.05}.get(label, 0.0)
    matrix = np.clip(rng.uniform(0.1, 0.9, (t, t)) + boost, 0, 1).tolist()
    baseline = rng.uniform(0.05, 0.15, t).tolist()
    summary = {
        "kind": "summary",
        "status": "completed",
        **continual_metrics(matrix, baseline),
        "matrix": matrix,
        "baseline": baseline,
        "step_time_median": 0.001 if label == "sgd" else 0.04,
    }
    (folder / "metrics.jsonl").write_text(json.dumps(summary) + "\n")
    info = {"commit": "abc", "clean_tree": True, "machine": "test machine"}
    (folder / "run.json").write_text(json.dumps(info))


def test_the_report_puts_the_endpoint_first(tmp_path):
    pytest.importorskip("matplotlib")
    study = load_study()
    rng = np.random.default_rng(0)
    for benchmark in study.benchmarks:
        for label in PRIMARY:
            for seed in range(3):
                _fake_run(tmp_path, benchmark, label, seed, rng)
    run_dir(tmp_path, "permuted_mnist", "gem", 4).mkdir(parents=True)  # unfinished: left out
    assert len(load_runs(tmp_path)) == 30
    text = build_report(tmp_path, study).read_text()
    assert text.index("## Endpoint") < text.index("## Sanity checks") < text.index("## Every")
    assert "Runs finished: 30 of 70" in text
    assert text.count("incomplete (3 of 5 seeds)") == 4  # 2 primary verdicts + 2 secondary
    assert "| Permuted MNIST | A-GEM | 3 |" in text and "× SGD" in text
    assert "40.0 [40.0, 40.0]" in text  # step-cost ratio to plain SGD
    for benchmark in study.benchmarks:
        assert (tmp_path / f"accuracy_matrices_{benchmark}.png").stat().st_size > 0
        assert f"(accuracy_matrices_{benchmark}.png)" in text
    assert study.preregistration in text


def test_a_chunk_runs_skips_and_resumes(tmp_path, capsys):
    """One real (tiny) run through the chunk runner: its files, then a skip."""
    data = write_tiny_mnist(tmp_path / "data")
    study = load_study()
    extra = [a for o in TINY_SETTINGS for a in ("--set", o)] + ["--data-dir", str(data)]
    record = RUNNER.run_one(study, Cell(1, "permuted_mnist", 0, "sgd"), tmp_path, extra)
    folder = run_dir(tmp_path, "permuted_mnist", "sgd", 0)
    assert record["exit_code"] == 0, (folder / "run.log").read_text()
    assert is_complete(folder) and json.loads((folder / "run.json").read_text())["wall_s"] > 0
    args = ["--out", str(tmp_path), "--max-runs", "0", "--no-report", "--allow-dirty"]
    assert main(args) == 0
    assert "1 of 70 runs done" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[-1] == "done" and listing[1].split()[-1] == "-"
