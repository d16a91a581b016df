"""``gcgd-train``: exit codes and messages (in-process), and ``python -m gcgd_jax.train --help``."""

import subprocess
import sys

import pytest

from gcgd_jax.train.cli import main
from gcgd_jax.train.report import read_metrics

TINY = [
    "--set", "data.name=synthetic",
    "--set", "data.synthetic_image_shape=[8, 8, 3]",
    "--set", "data.synthetic_train_size=32",
    "--set", "data.synthetic_test_size=16",
    "--set", "data.batch_size=8",
    "--set", "optim.lr=0.05",
]  # fmt: skip


def test_trains_a_tiny_model(tmp_path, capsys):
    """GC-ODE (gradient mode), PowerGrad, a correction and the gradient-norm penalty together."""
    out = tmp_path / "run"
    code = main(
        [
            *TINY,
            "--set",
            "model.gc_ode=gradient",
            "--set",
            "loss.name=powergrad",
            "--set",
            "corrections.chain=centralize",
            "--set",
            "loss.penalty=gradient_norm",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "epoch 1/1 [" in captured.err  # the progress bar
    assert "train loss" in captured.out and "final_test_acc = " in captured.out  # the summary table
    records = read_metrics(out / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["epoch", "summary"]
    assert records[0]["gc_ode_loss"] > 0.0 and records[0]["step"] == 4
    assert (out / "config.toml").is_file() and (out / "checkpoints" / "4").is_dir()

    # The same folder again: refused without --resume; with it, nothing is left to do.
    assert main([*TINY, "--out", str(out)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--resume"]) == 0  # reuses the run's config.toml
    assert "resumed from checkpoint at step 4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.name=imagenet21k"], "data.name: unknown value 'imagenet21k'"),
        (["--set", "model.name=vgg16"], "model.name: unknown value 'vgg16'"),
        (["--set", "corrections.chain=gc_x"], "corrections.chain: unknown value 'gc_x'"),
        (["--set", "optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["--set", "train.epochs=-1"], "train.epochs: must be >= 1"),
        (["--config", "no_such_config"], "configuration 'no_such_config' not found"),
        (["--set", "data.batch_size=9"], "must be divisible by the number of devices (2)"),
        (
            ["--set", "corrections.chain=znorm", "--set", "corrections.znorm.epsilon=1"],
            "corrections.znorm: unknown option 'epsilon'",
        ),
    ],
)
def test_bad_input_gives_a_short_message_and_exit_2(tmp_path, capsys, args, message):
    code = main([*TINY, *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gcgd-train: error: ") and message in err, err
    assert "Traceback" not in err


def test_missing_data_folder(tmp_path, capsys):
    code = main(
        [
            "--set",
            "data.name=mnist",
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gcgd-train: error: data: ") and "nowhere" in err, err


def test_nonfinite_loss_exits_3(tmp_path, capsys):
    code = main(
        [
            *TINY,
            "--set",
            "optim.lr=1e30",
            "--set",
            "optim.schedule=constant",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss" in err and "train.nan_policy=skip" in err
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_print_config(capsys):
    assert main(["--config", "quickstart", "--set", "optim.lr=0.05", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.05" in out and "[corrections.gc_w]" in out


def test_module_help():
    result = subprocess.run(
        [sys.executable, "-m", "gcgd_jax.train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0
    assert "usage: gcgd-train" in result.stdout and "--resume" in result.stdout
