"""``train.final_test``: epochs evaluate the validation split, the test split is evaluated
once after the last step (single runs and seed-parallel replicas)."""

import io

import numpy as np
import pytest

from gcgd_jax.train import Trainer, load_config
from gcgd_jax.train.cli import main
from gcgd_jax.train.config import ConfigError
from gcgd_jax.train.report import read_metrics
from gcgd_jax.train.trainer import replica_config, replica_dir
from tests.train import test_trainer

VAL = [
    *test_trainer.TINY,
    "data.synthetic_train_size=48",
    "data.val_fraction=0.25",  # 12 validation examples from the 48, 36 left to train on
    "data.eval_split=val",
    "train.final_test=true",
    "train.epochs=2",
]


def _records(path):
    return read_metrics(path / "metrics.jsonl")


def test_epochs_see_validation_and_the_summary_the_test_split(tmp_path):
    cfg = load_config("quickstart", VAL)
    trainer = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO())
    assert trainer.test_ds.split == "test" and len(trainer.test_ds.labels) == 16
    assert len(trainer.eval_ds.labels) == 12 and len(trainer.train_ds.labels) == 36
    (summary,) = trainer.run().values()
    epochs = [r for r in _records(tmp_path) if r["kind"] == "epoch"]
    assert all(r.get("val_acc") is not None and "test_acc" not in r for r in epochs)
    assert summary["final_val_acc"] == epochs[-1]["val_acc"]
    # The reported test numbers are those of the final state on the whole test split.
    (again,) = trainer.evaluate(trainer.test_ds, "test")
    np.testing.assert_allclose(summary["final_test_loss"], again["test_loss"], rtol=1e-6)
    assert summary["final_test_acc"] == again["test_acc"]
    assert _records(tmp_path)[-1]["final_test_acc"] == summary["final_test_acc"]
    assert "final test (16 examples" in (tmp_path / "run.log").read_text()


def test_a_resumed_run_ends_with_its_final_test(tmp_path):
    cfg = load_config("quickstart", VAL)
    trainer = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO())
    total = trainer.total_steps
    trainer.run(stop_at_step=total - 1)  # as if killed before the last step
    (summary,) = Trainer(cfg, out_dir=tmp_path, resume=True, stream=io.StringIO()).run().values()
    assert summary["status"] == "completed" and summary["final_test_acc"] is not None
    assert _records(tmp_path)[-1]["kind"] == "summary"


def test_seed_parallel_replicas_report_their_own_final_test(tmp_path):
    cfg = load_config("quickstart", [*VAL, "optim.lr=0.01", "run.seeds=[0, 1]"])
    summaries = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run()
    single = Trainer(replica_config(cfg, 1, tmp_path / "alone"), stream=io.StringIO()).run()[1]
    np.testing.assert_allclose(
        summaries[1]["final_test_loss"], single["final_test_loss"], rtol=1e-4
    )
    assert abs(summaries[1]["final_test_acc"] - single["final_test_acc"]) <= 1 / 16 + 1e-9
    assert summaries[0]["final_test_loss"] != summaries[1]["final_test_loss"]
    for seed in (0, 1):
        log = (replica_dir(tmp_path, seed) / "run.log").read_text()
        assert log.count("final test (16 examples") == 1


def test_final_test_needs_a_validation_split():
    with pytest.raises(ConfigError, match="train.final_test = true needs data.eval_split = 'val'"):
        load_config("quickstart", [*test_trainer.TINY, "train.final_test=true"])


def test_final_test_error_from_the_cli(capsys):
    argv = ["--config", "quickstart", "--set", "train.final_test=true", "--print-config"]
    assert main(argv) == 2
    assert "train.final_test" in capsys.readouterr().err
