"""What a user sees: the compile line, evaluation progress, the final table, run.log, TensorBoard."""

import pytest

from gcgd_jax.train import report
from gcgd_jax.train.cli import main
from tests.train.test_cli import TINY
from tests.train.test_report import _events


def test_compile_lines_progress_table_and_run_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--set", "train.epochs=2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("compiling the train step") == 1  # once per process, not per epoch
    assert "train step compiled; first step done in" in err
    assert err.count("compiling the evaluation step") == 1
    assert "evaluating on test [" in err  # the evaluation's progress bar
    log = (out / "run.log").read_text()
    for line in ("gcgd-train: resnet20 on synthetic", "train step compiled", "epoch 2/2 | step 8"):
        assert line in log
    table = [x for x in captured.out.splitlines() if x.strip().startswith(("epoch", "1", "2"))]
    assert any("train loss" in x for x in table)
    assert "train loss" in log and "test acc" in log  # the final table is in the log too


def test_tensorboard_flag_writes_per_step_scalars(tmp_path, capsys):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    args = [*TINY, "--set", "log.tensorboard_every_steps=2", "--tensorboard", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    events = _events(out / "tensorboard")
    steps = sorted({s for tag, s, _ in events if tag == "step/loss"})
    assert steps == [2, 4]  # every 2 of the 4 steps
    assert any(tag == "test_acc" and s == 4 for tag, s, _ in events)  # the epoch record


def test_tensorboard_without_the_extra_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "_tensorboard_module", lambda: None)
    out = tmp_path / "run"
    assert main([*TINY, "--tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'gcgd-jax[tensorboard]'" in err[0]
    assert not out.exists()  # nothing written


def test_unknown_config_and_unreadable_data_dir_exit_2(tmp_path, capsys):
    assert main(["--config", "no_such_config", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "configuration 'no_such_config' not found" in err and "available: " in err
    code = main(["--config", "quickstart", "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "b")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "--data-dir" in err[0]
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_gc_w_v2_runs_record_the_predictor_objective(tmp_path, capsys):
    from gcgd_jax.train.report import read_metrics

    out = tmp_path / "run"
    args = [*TINY, "--set", "corrections.chain=gc_w_v2", "--no-progress", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    (epoch,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "epoch"]
    value = epoch["gc_w_v2_objective"]
    assert isinstance(value, float) and -1.0 <= value <= 1.0 and value != 0.0  # it trained
