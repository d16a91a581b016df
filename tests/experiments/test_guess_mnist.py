"""The pre-registered gradient-guess training study: its definition and one real (tiny) run
through the chunk runner."""

from __future__ import annotations

from experiments.studies.guess_mnist import OUT, RUNNER, load_study, main
from experiments.studies.study import is_complete, overrides, run_dir
from gcgd_jax.train.config import load_config
from tests.continual.tiny import write_tiny_mnist

PRIMARY = ["bp", "directional", "activation", "transpose", "mixing"]
ESTIMATORS = {
    "bp": "backprop",
    "directional": "weight_perturbation",
    "activation": "activity_perturbation",
    "transpose": "guess_transpose",
    "mixing": "guess_activation_mixing",
}


def test_the_study_is_the_pre_registered_grid():
    study = load_study()
    tuning, grid = study.cells(0), study.cells(1)
    assert len(tuning) == 5 * 4 and {c.lr for c in tuning} == {1e-4, 3e-4, 1e-3, 3e-3}
    assert {c.seed for c in tuning} == {1000}
    assert [c.label for c in grid[:5]] == PRIMARY and len(grid) == 15
    assert {c.seed for c in grid} == {0, 1, 2} and study.cells(2) == []
    assert "Primary endpoint (pre-registered" in study.preregistration
    for label, variant in study.variants.items():  # every variant is a valid configuration
        cfg = load_config(None, [*study.base, *variant, "data.name=mnist"])
        assert cfg.model.name == "mlp" and cfg.model.hidden_features == (256, 256), label
        assert cfg.gradient.estimator == ESTIMATORS[label] and cfg.gradient.num_directions == 16
        assert cfg.optim.name == "adam" and cfg.train.epochs == 3
    tune = overrides(study, tuning[0], OUT, "data.name")
    assert "data.eval_split=val" in tune and "optim.lr=0.0001" in tune


def test_a_chunk_runs_skips_and_resumes(tmp_path, capsys):
    """One real (tiny) tuning run of a guess through the chunk runner: its files, then a skip."""
    data = write_tiny_mnist(tmp_path / "data")
    study = load_study()
    tiny = ["train.epochs=1", "data.batch_size=50", "data.eval_batch_size=50"]
    extra = [a for o in tiny for a in ("--set", o)] + ["--data-dir", str(data)]
    cell = next(c for c in study.cells(0) if c.label == "transpose")
    record = RUNNER.run_one(study, cell, tmp_path, extra)
    folder = run_dir(tmp_path, cell.benchmark, cell.label, cell.seed, cell.lr)
    assert record["exit_code"] == 0, (folder / "run.log").read_text()
    assert is_complete(folder) and "gradient.estimator=guess_transpose" in record["command"]
    assert main(["--out", str(tmp_path), "--max-runs", "0", "--no-report", "--allow-dirty"]) == 0
    assert "1 of 35 runs done" in capsys.readouterr().out
