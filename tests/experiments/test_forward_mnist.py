"""The pre-registered forward-gradient study: its definition, the learning-rate tuning rule,
the chunk runner (``experiments/studies/study.py``) and the report, on fake and tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.studies.forward_mnist import OUT, RUNNER, load_study, main
from experiments.studies.forward_report import build_report, verdict_below, verdict_within
from experiments.studies.study import Cell, is_complete, overrides, run_dir, tuned_lrs
from experiments.suites.stats import paired
from gcgd_jax.train.config import load_config
from tests.continual.tiny import write_tiny_mnist

PRIMARY = ["bp", "fg_w", "fg_a", "lg_fg_w", "lg_fg_a"]


def test_the_study_is_the_pre_registered_grid():
    study = load_study()
    tuning, grid = study.cells(0), study.cells(1)
    assert len(tuning) == 6 * 4 * 2 and {c.lr for c in tuning} == {0.01, 0.03, 0.1, 0.3}
    assert {c.seed for c in tuning} == {1000, 1001}
    assert [c.label for c in grid[:5]] == PRIMARY and len(grid) == 15
    assert {c.seed for c in grid} == {0, 1, 2} and len(study.cells(2)) == 3
    assert "Primary endpoint (pre-registered" in study.preregistration
    for label, variant in study.variants.items():  # every variant is a valid configuration
        cfg = load_config(None, [*study.base, *variant, "data.name=mnist"])
        assert cfg.model.mixer == "M/1/16" and cfg.train.epochs == 20, label
        assert cfg.gradient.num_directions == 1 and cfg.optim.momentum == 0.0
    tune = overrides(study, tuning[0], OUT, "data.name")
    assert "data.eval_split=val" in tune and "optim.lr=0.01" in tune


def _fake_tuning(out, study, scores):
    """Finished tuning runs: ``scores[label][lr]`` -> the final val acc of both seeds (None:
    a run stopped by a non-finite loss)."""
    for label, by_lr in scores.items():
        for lr, acc in by_lr.items():
            for seed in study.tuning.seeds:
                folder = run_dir(out, "mnist", label, seed, lr)
                folder.mkdir(parents=True)
                records = [{"kind": "epoch", "val_acc": acc}] if acc is not None else []
                status = "completed" if acc is not None else "nonfinite"
                records.append({"kind": "summary", "status": status})
                (folder / "metrics.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in records)
                )


def test_tuning_picks_the_best_validation_accuracy_ties_to_the_smaller_rate(tmp_path):
    study = load_study()
    scores = {
        "bp": {0.01: 0.90, 0.03: 0.95, 0.1: 0.97, 0.3: 0.96},
        "fg_w": {0.01: 0.80, 0.03: 0.85, 0.1: 0.85, 0.3: None},  # tie; 0.3 diverged
        "fg_a": {0.01: 0.5, 0.03: None, 0.1: None, 0.3: None},
    }
    _fake_tuning(tmp_path, study, scores)
    chosen = tuned_lrs(study, tmp_path)
    assert chosen["mnist", "bp"] == 0.1 and chosen["mnist", "fg_w"] == 0.03
    assert chosen["mnist", "fg_a"] == 0.01
    assert chosen["mnist", "lg_bp"] is None  # not tuned yet
    cell = Cell(1, "mnist", 0, "fg_w")
    assert "optim.lr=0.03" in overrides(study, cell, tmp_path, "data.name")
    with pytest.raises(ValueError, match="lg_fg_a on mnist: its learning-rate tuning"):
        overrides(study, Cell(1, "mnist", 0, "lg_fg_a"), tmp_path, "data.name")


def _comparison(diffs):
    return paired(dict(enumerate(diffs)), dict.fromkeys(range(len(diffs)), 0.0))


def test_endpoint_verdicts():
    assert verdict_below(_comparison([-1.0, -1.2, -0.9]), 3) == "supported"
    assert verdict_below(_comparison([-1.0, 1.2, -0.9]), 3) == "not supported"
    assert verdict_below(_comparison([-1.0, -1.2]), 3) == "incomplete (2 of 3 seeds)"
    assert verdict_within(_comparison([0.1, 0.2, 0.15]), 3) == "supported"
    assert verdict_within(_comparison([2.1, 2.2, 2.15]), 3) == "contradicted"
    assert verdict_within(_comparison([0.1, 2.2, 0.15]), 3) == "inconclusive"


def _fake_grid_run(out, label, seed, error):
    folder = run_dir(out, "mnist", label, seed)
    folder.mkdir(parents=True)
    epochs = [
        {"kind": "epoch", "test_acc": 1 - (error + 2.0 / (e + 1)) / 100, "step_time_median": 0.01}
        for e in range(3)
    ]
    records = [*epochs, {"kind": "summary", "status": "completed"}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps({"machine": "test machine"}))


def test_the_report_puts_the_endpoint_first(tmp_path):
    pytest.importorskip("matplotlib")
    study = load_study()
    errors = {"bp": 2.0, "fg_w": 9.0, "fg_a": 4.0, "lg_fg_w": 6.0, "lg_fg_a": 2.3}
    rng = np.random.default_rng(0)
    for label, error in errors.items():
        for seed in range(3):
            _fake_grid_run(tmp_path, label, seed, error + rng.normal(0, 0.05))
    text = build_report(tmp_path, study).read_text()
    assert text.index("## Endpoint") < text.index("## Sanity check") < text.index("## Every")
    assert "Grid runs finished: 15 of 18" in text
    assert "| (a) FG-A − FG-W | 3 |" in text and "upper end < 0 | supported |" in text
    assert "within ±1 pp | supported |" in text
    assert "passed" in text and "| FG-W | 3 | " in text and "| 8.56 |" in text
    assert (tmp_path / "test_error_mnist.png").stat().st_size > 0
    assert study.preregistration in text


def test_a_chunk_runs_skips_and_resumes(tmp_path, capsys):
    """One real (tiny) tuning run through the chunk runner: its files, then a skip."""
    data = write_tiny_mnist(tmp_path / "data")
    study = load_study()
    tiny = ["model.mixer=S/1/1", "train.epochs=1", "data.batch_size=50", "data.eval_batch_size=50"]
    extra = [a for o in tiny for a in ("--set", o)] + ["--data-dir", str(data)]
    cell = study.cells(0)[0]
    record = RUNNER.run_one(study, cell, tmp_path, extra)
    folder = run_dir(tmp_path, cell.benchmark, cell.label, cell.seed, cell.lr)
    assert record["exit_code"] == 0, (folder / "run.log").read_text()
    assert is_complete(folder) and "--no-progress" in record["command"]
    assert main(["--out", str(tmp_path), "--max-runs", "0", "--no-report", "--allow-dirty"]) == 0
    assert "1 of 66 runs done" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--list", "--phase", "0"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[-1] == "done" and listing[1].split()[-1] == "-"
