"""``gcgd-continual`` end to end: every method, resume, and bad input (exit 2, one line)."""

from __future__ import annotations

import pytest

from gcgd_jax.continual.cli import main
from gcgd_jax.continual.config import METHODS, load_config
from gcgd_jax.train.report import read_metrics
from tests.continual.tiny import tiny_args, write_tiny_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_from_the_command_line(method, data_dir, tmp_path, capsys):
    out = tmp_path / method
    assert main(tiny_args(data_dir, out, f"method.name={method}")) == 0, capsys.readouterr().err
    assert "ACC = " in capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["method"] == method
    assert len(summary["matrix"]) == 3 and all(len(row) == 3 for row in summary["matrix"])
    assert load_config(out / "config.toml").method.name == method


def test_resume_reuses_the_runs_configuration(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(data_dir, out)) == 0
    first = read_metrics(out / "metrics.jsonl")[-1]
    assert main(["--out", str(out), "--resume", "--quiet"]) == 0, capsys.readouterr().err
    assert read_metrics(out / "metrics.jsonl")[-1]["matrix"] == first["matrix"]
    assert main(tiny_args(data_dir, out)) == 2  # a finished run is not overwritten silently
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gcgd-continual: error: output folder") and "--resume" in err[-1]


def test_print_config_round_trips(tmp_path, capsys):
    args = ["--set", "method.name=gem", "--set", "method.options.eps=0.01", "--print-config"]
    assert main(args) == 0
    path = tmp_path / "c.toml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(path)
    assert cfg == load_config(None, ["method.name=gem", "method.options.eps=0.01"])
    assert cfg.method.options == {"eps": 0.01}


BAD = [
    (["--set", "train.memory_size=0"], "train.memory_size: must be >= 1"),
    (["--set", "method.name=ewc"], "method.name: unknown value 'ewc'"),
    (
        ["--set", "tasks.benchmark=rotated_mnist", "--set", "tasks.angles=[0, 45]"],
        "tasks.angles: 2 angles for tasks.num_tasks = 20 tasks",
    ),
    (["--set", "tasks.num_tasks=1"], "tasks.num_tasks: must be >= 2"),
    (["--set", "tasks.samples_per_task=70000"], "more than the 60,000 training images"),
    (["--set", "tasks.samples_per_task=995"], "not a multiple of train.batch_size"),
    (["--set", "train.memory_size=1001"], "a task has only tasks.samples_per_task = 1000"),
    (["--set", "method.name=gem", "--set", "method.options.rho=1"], "unknown option 'rho'"),
    (["--set", "method.options.eps=1"], "plain SGD takes no options"),
    (["--set", "method.groups=pairs"], "method.groups: unknown value 'pairs'"),
    (["--set", "train.lr=fast"], "train.lr: expected a number"),
    (["--set", "train.lr_=0.1"], "unknown key train.lr_ (did you mean 'lr'?)"),
    (["--set", "optim.lr=0.1"], "unknown section 'optim'"),
    (["--config", "missing.toml"], "configuration file missing.toml not found"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gcgd-continual: error: "), err
    assert message in err[0]
    assert not out.exists()  # refused before any data is read or any file written


def test_several_problems_are_reported_together(capsys):
    assert main(["--set", "train.memory_size=0", "--set", "method.name=ewc"]) == 2
    err = capsys.readouterr().err
    assert "train.memory_size" in err and "method.name" in err and len(err.splitlines()) == 1


def test_data_that_does_not_match_is_exit_2(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(data_dir, out, "tasks.samples_per_task=400")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 300 training images" in err[0]
    assert main(tiny_args(tmp_path / "empty", tmp_path / "run2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gcgd-continual: error: data: ")


def test_no_arguments_and_resume_with_nothing(tmp_path, capsys):
    assert main([]) == 2
    assert "nothing to run" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
