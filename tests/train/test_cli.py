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
            "model.gc_ode.mode=gradient",
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
        (
            ["--set", "model.gc_ode.mode=branch", "--set", "model.gc_ode.sobolev_weight=1"],
            "model.gc_ode: GCODEConfig.sobolev_weight trains the branch of 'gradient' mode",
        ),
        (
            ["--set", "model.gc_ode=gradient"],
            (
                "model.gc_ode: is a table of GC-ODE settings, got 'gradient': write "
                '[model.gc_ode] mode = "gradient" in a file, model.gc_ode.mode=gradient on the '
                "command line"
            ),
        ),
        (
            ["--set", "model.gc_ode_steps=2"],
            "model.gc_ode_steps: GC-ODE's settings are the [model.gc_ode] table's keys now",
        ),
        (
            ["--set", "model.gc_ode.mode=gradient", "--set", "model.gc_ode.stepz=2"],
            "unknown key model.gc_ode.stepz (a GCODEConfig field) (did you mean 'steps'?)",
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


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_resume_with_every_checkpoint_damaged_exits_2_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-progress", "--out", str(out)]) == 0
    for f in (out / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"damaged")
    before = _files(out)
    capsys.readouterr()
    assert main(["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcgd-train: error: cannot resume") and "(damaged: step 4)" in err, err
    assert "Nothing in" in err and "--overwrite" in err and "Traceback" not in err
    assert _files(out) == before  # metrics.jsonl, config.toml and checkpoints untouched


def test_interrupt_exits_130_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    from gcgd_jax.train.trainer import Trainer

    end_epoch = Trainer._end_epoch

    def end_epoch_then_ctrl_c(self, *args, **kwargs):
        end_epoch(self, *args, **kwargs)  # epoch 1's record and checkpoint (step 4) are written
        raise KeyboardInterrupt

    out = tmp_path / "run"
    args = [*TINY, "--set", "train.epochs=2", "--no-progress", "--out", str(out)]
    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch_then_ctrl_c)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; the newest checkpoint is at step 4 (continue with --resume)" in err
    assert err.rstrip().endswith("gcgd-train: error: interrupted")
    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert "resumed from checkpoint at step 4" in capsys.readouterr().err
    summary = read_metrics(out / "metrics.jsonl")[-1]
    assert summary["resumed_from_step"] == 4 and summary["steps_run"] == 4


def test_emptied_chain_no_progress_and_overwrite(tmp_path, capsys):
    """``--config quickstart --set corrections.chain=`` trains without GC-W (its options are
    ignored with a one-line note); --no-progress draws no bar; --overwrite replaces the run."""
    out = tmp_path / "run"
    args = ["--config", "quickstart", "--set", "corrections.chain=", *TINY, "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    note = "note: ignoring the options [corrections.gc_w]: not in corrections.chain []"
    assert err.count(note) == 1 and "epoch 1/1 [" not in err, err
    assert "gc_w_predictor_loss" not in read_metrics(out / "metrics.jsonl")[0]

    assert main([*args, "--set", "optim.lr=0.02", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "epoch 1/1 [" in err  # the progress bar is on by default
    assert [r["kind"] for r in read_metrics(out / "metrics.jsonl")] == ["epoch", "summary"]
    assert "lr = 0.02" in (out / "config.toml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]


def test_print_config_of_an_emptied_chain(capsys):
    assert main(["--config", "quickstart", "--set", "corrections.chain=", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "chain = []" in captured.out
    assert captured.err.strip().splitlines() == [
        "note: ignoring the options [corrections.gc_w]: not in corrections.chain []"
    ]


def test_list_configs(capsys):
    assert main(["--list-configs"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    names = {row.split()[0] for row in rows}
    assert {"quickstart", "cifar10_resnet20", "cifar10_resnet20_gcgd"} <= names
    assert all(row.split()[-1].endswith(".toml") for row in rows)


def test_out_naming_a_file_and_resume_with_nothing_to_resume_exit_2(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert main([*TINY, "--out", str(a_file)]) == 2
    assert f"output folder {a_file} is a file; choose another --out" in capsys.readouterr().err
    assert a_file.read_text() == "keep"
    empty = tmp_path / "empty"
    assert main(["--out", str(empty), "--resume"]) == 2  # no --config, no earlier run there
    err = capsys.readouterr().err
    assert f"nothing to resume in {empty}" in err and "Traceback" not in err
    assert not empty.exists()


def test_no_arguments_trains_nothing(tmp_path, monkeypatch, capsys):
    """A bare ``gcgd-train`` prints its usage and the quickstart command (exit 2), and writes
    nothing: no run folder, no data cache."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: gcgd-train"), captured.err
    assert "gcgd-train --config quickstart --out runs/quickstart" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_version_and_help_say_what_a_user_needs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    import jax

    import gcgd_jax

    assert out.startswith(f"gcgd-train {gcgd_jax.__version__} (jax {jax.__version__}, ")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for needle in ("exit codes:", "130  interrupted", "--print-config", "docs/guides/cli.md"):
        assert needle in out, needle
