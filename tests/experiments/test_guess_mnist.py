"""The pre-registered gradient-guess training study: its definition, the report on fake runs
and one real (tiny) run through the chunk runner."""

from __future__ import annotations

import json

import pytest

from experiments.studies.guess_mnist import OUT, RUNNER, load_study, main
from experiments.studies.guess_report import build_report
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


DIRECTIONAL = [85.0, 85.2, 84.9]  # final test accuracy (%) per seed
# (a) supported for activation perturbation and W^T, not for mixing; (b) supported for all
ACCURACY = {
    "bp": [98.0, 98.1, 97.9],
    "directional": DIRECTIONAL,
    "activation": [d + x for d, x in zip(DIRECTIONAL, [5.0, 5.1, 4.9], strict=True)],
    "transpose": [d + x for d, x in zip(DIRECTIONAL, [3.0, 3.2, 2.9], strict=True)],
    "mixing": [d + x for d, x in zip(DIRECTIONAL, [0.5, -0.5, 0.1], strict=True)],
}
STEP_TIME = {"bp": 0.003, "directional": 0.24, "activation": 0.027, "transpose": 0.055}


def _fake_grid_run(out, label, seed, accuracy):
    """A finished 3-epoch grid run ending at ``accuracy`` (%)."""
    folder = run_dir(out, "mnist", label, seed)
    folder.mkdir(parents=True)
    epochs = [
        {
            "kind": "epoch",
            "train_loss": 0.5 / (e + 1),
            "test_acc": (accuracy - 2.0 / (e + 1) + 2.0 / 3) / 100,
            "step_time_median": STEP_TIME.get(label, 0.038),
        }
        for e in range(3)
    ]
    records = [*epochs, {"kind": "summary", "status": "completed"}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps({"machine": "test machine", "load_avg": [2.0]}))


def _fake_grid(out, accuracy, seeds=None):
    for label, values in accuracy.items():
        for seed, value in enumerate(values[: (seeds or {}).get(label, 3)]):
            _fake_grid_run(out, label, seed, value)


def _fake_tuning(out, study, chosen):
    """Finished tuning runs in which each variant's best validation accuracy is at ``chosen``."""
    for label, best in chosen.items():
        for lr in study.tuning.lrs:
            folder = run_dir(out, "mnist", label, study.tuning.seeds[0], lr)
            folder.mkdir(parents=True)
            records = [
                {"kind": "epoch", "val_acc": 0.95 if lr == best else 0.9},
                {"kind": "summary", "status": "completed"},
            ]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _cells(text, first):
    """The cells of the table row that starts with ``first``."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_the_report_puts_the_endpoint_first(tmp_path):
    pytest.importorskip("matplotlib")
    study = load_study()
    _fake_grid(tmp_path, ACCURACY)
    text = build_report(tmp_path, study).read_text()
    headings = ["## Endpoint", "## Sanity check", "## Every variant", "## Learning-rate tuning",
                "## Test accuracy per epoch", "## Training loss per epoch", "## Pre-registration"]  # fmt: skip
    assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)
    assert text.startswith("# Study guess_mnist: gradient guesses against directional descent")
    assert "Grid runs finished: 15 of 15. Machine: test machine." in text
    a = "(a) {} − directional descent"
    for family, verdict in (("activation perturbation", "supported"), ("Wᵀ", "supported"),
                            ("activation mixing", "not supported")):  # fmt: skip
        a_row, b_row = _cells(text, a.format(family)), _cells(text, f"(b) {family} − BP")
        assert a_row[1] == "3" and a_row[3:5] == ["lower end > 0", verdict], family
        assert b_row[3:5] == ["upper end < 0", "supported"] and b_row[2].startswith("-"), family
    assert _cells(text, a.format("activation perturbation"))[2].startswith("+5.00 [")
    assert _cells(text, a.format("activation perturbation"))[5].endswith("(rejects 0)")
    assert _cells(text, a.format("activation mixing"))[5].endswith("(does not reject 0)")
    assert "criterion: above 97%): passed." in text and "FAILED" not in text
    bp, directional = _cells(text, "BP"), _cells(text, "directional descent")
    assert bp[1:3] == ["3", "98.00 [97.75, 98.25]"] and bp[4] == "1.00 [1.00, 1.00]"
    assert directional[3:] == ["—", "80.00 [80.00, 80.00]", "—"]  # no tuning, no flag
    assert _cells(text, "activation perturbation − Wᵀ")[1].startswith("+1.97 [")
    assert (tmp_path / "test_acc_mnist.png").stat().st_size > 0
    assert (tmp_path / "train_loss_mnist.png").stat().st_size > 0
    assert study.preregistration in text and study.expected_time in text


def test_the_report_flags_a_rate_at_the_grid_end_and_a_failed_sanity_check(tmp_path):
    pytest.importorskip("matplotlib")
    study = load_study()
    chosen = {"bp": 1e-3, "directional": 1e-4, "activation": 3e-4, "transpose": 3e-3}
    _fake_tuning(tmp_path, study, chosen)
    _fake_grid(tmp_path, {**ACCURACY, "bp": [96.0, 96.5, 96.2]}, seeds={"mixing": 2})
    text = build_report(tmp_path, study).read_text()
    for label, lr in (("BP", "0.001"), ("directional descent", "0.0001"),
                      ("activation perturbation", "0.0003"), ("Wᵀ", "0.003")):  # fmt: skip
        cells = _cells(text, label)
        assert cells[3] == lr, label
        at_end = label in ("directional descent", "Wᵀ")
        assert (cells[-1] == "learning rate at the grid's end") == at_end, label
    assert _cells(text, "activation mixing")[3:] == ["—", "12.67 [12.67, 12.67]", "—"]
    assert "| **95.00** | 90.00 | 90.00 | 90.00 |" in text  # directional: 1e-4 chosen
    mixing = _cells(text, "(a) activation mixing − directional descent")
    assert mixing[1] == "2" and mixing[4] == "incomplete (2 of 3 seeds)"
    assert "Grid runs finished: 14 of 15" in text
    assert "criterion: above 97%): FAILED: the protocol is broken." in text
    assert text.index("Flag: the sanity check below FAILED") < text.index("## Sanity check")


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
