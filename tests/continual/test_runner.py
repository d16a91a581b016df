"""The continual-learning runner (:mod:`gcgd_jax.continual.runner`): the run folder, the
records, checkpoints after every task and an exact resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gcgd_jax.continual.config import load_config
from gcgd_jax.continual.metrics import continual_metrics
from gcgd_jax.continual.runner import ContinualRunner
from gcgd_jax.continual.tasks import load_tasks
from gcgd_jax.train.config import ConfigError
from gcgd_jax.train.report import read_metrics
from tests.continual.tiny import TINY_SETTINGS, write_tiny_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="module")
def setting(data_dir):
    cfg = load_config(
        None,
        [*TINY_SETTINGS, f"tasks.data_dir={data_dir}", "method.name=layerwise_decomposition"],
    )
    return cfg, load_tasks(cfg)


@pytest.fixture(scope="module")
def uninterrupted(setting, tmp_path_factory):
    cfg, tasks = setting
    runner = ContinualRunner(cfg, out_dir=tmp_path_factory.mktemp("full"), tasks=tasks, stream=None)
    summary = runner.run()
    return runner, summary


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_the_run_folder_and_its_records(uninterrupted):
    runner, summary = uninterrupted
    out = runner.out
    assert (out / "config.toml").is_file()
    assert load_config(out / "config.toml") == runner.cfg  # the TOML round trip
    records = read_metrics(out / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["baseline", "task", "task", "task", "summary"]
    rows = [r["accuracies"] for r in records if r["kind"] == "task"]
    assert [r["step"] for r in records] == [0, 5, 10, 15, 15]
    assert summary == records[-1] and summary["status"] == "completed"
    assert summary["matrix"] == rows and summary["baseline"] == records[0]["accuracies"]
    for key, value in continual_metrics(rows, records[0]["accuracies"]).items():
        assert summary[key] == value
    assert all(0.0 <= a <= 1.0 for row in rows for a in row)
    assert records[2]["acc_seen"] == pytest.approx(np.mean(rows[1][:2]))
    assert summary["step_time_median"] > 0 and len(summary["compile_time"]) == 1
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [10, 15]  # keep=2


def test_resume_after_a_stop_equals_the_uninterrupted_run(setting, uninterrupted, tmp_path):
    """Stopped after the first task's checkpoint (as if killed), then resumed: the same
    accuracy matrix, records and final parameters, bit for bit."""
    cfg, tasks = setting
    full_runner, full = uninterrupted
    out = tmp_path / "stopped"
    assert (
        ContinualRunner(cfg, out_dir=out, tasks=tasks, stream=None).run(stop_after_task=0) is None
    )
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        ContinualRunner(cfg, out_dir=out, tasks=tasks, stream=None)
    resumed_runner = ContinualRunner(cfg, out_dir=out, resume=True, tasks=tasks, stream=None)
    resumed = resumed_runner.run()
    for key in ("matrix", "baseline", "acc", "bwt", "fwt", "step"):
        assert resumed[key] == full[key], key
    for a, b in zip(_leaves(resumed_runner.params), _leaves(full_runner.params), strict=True):
        np.testing.assert_array_equal(a, b)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["baseline", "task", "resume", "task", "task", "summary"]
    assert records[2] == {"kind": "resume", "step": 5, "task": 1}
    full_records = read_metrics(full_runner.out / "metrics.jsonl")
    assert [r.get("train_loss") for r in records if r["kind"] == "task"] == [
        r.get("train_loss") for r in full_records if r["kind"] == "task"
    ]
    # resuming a finished run changes nothing but its summary's times
    again = ContinualRunner(cfg, out_dir=out, resume=True, tasks=tasks, stream=None).run()
    assert again["matrix"] == full["matrix"]


def test_resume_refuses_another_configuration(setting, tmp_path):
    cfg, tasks = setting
    out = tmp_path / "run"
    ContinualRunner(cfg, out_dir=out, tasks=tasks, stream=None).run(stop_after_task=0)
    other = cfg.replace(train={"lr": 0.05})
    with pytest.raises(ConfigError, match=r"differs from the checkpointed run in train\.lr"):
        ContinualRunner(other, out_dir=out, resume=True, tasks=tasks, stream=None).run()
    # --overwrite starts again in the same folder
    summary = ContinualRunner(other, out_dir=out, overwrite=True, tasks=tasks, stream=None).run()
    assert summary["status"] == "completed"
    assert read_metrics(out / "metrics.jsonl")[0]["kind"] == "baseline"


def test_the_folder_is_checked_before_any_data_is_read(setting, tmp_path):
    cfg, _ = setting
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    with pytest.raises(ConfigError, match="is a file"):
        ContinualRunner(cfg, out_dir=a_file)
    bad = cfg.replace(tasks={"data_dir": str(tmp_path / "nowhere")})
    (tmp_path / "held" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        ContinualRunner(bad, out_dir=tmp_path / "held")  # no data needed to say so
    with pytest.raises(ConfigError, match="train.memory_size: must be >= 1"):
        ContinualRunner(cfg.replace(train={"memory_size": 0}), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
