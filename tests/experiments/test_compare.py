"""The comparison suites' grids and method overrides are valid training configurations."""

import pytest

from experiments.suites.compare import METHODS, quick, suites
from gcgd_jax.train import load_config


@pytest.mark.parametrize("suite", sorted(suites()))
def test_every_cell_of_every_suite_is_a_valid_config(suite):
    for s in (suites()[suite], quick(suites()[suite])):
        for method, budget, seed in s.grid():
            overrides = (*s.overrides_for(method), f"run.seed={seed}", f"train.budget={budget}")
            cfg = load_config(s.base_config, overrides)
            assert cfg.train.budget == budget and cfg.run.seed == seed


def test_grid_sizes_follow_the_protocol():
    s = suites()["cpu-fmnist"]
    grid = s.grid()
    # 5 seeds x 6 budgets (0.5 ... 1.0) for the core methods, 3 seeds at 100% for the others.
    assert s.budgets == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    core, others = s.phases
    assert core.methods == ("baseline", "gc_w", "gc_ode_gradient", "gcgd")
    assert others.methods == tuple(m for m in METHODS if m not in core.methods)  # "rest"
    assert len(grid) == 5 * 6 * len(core.methods) + 3 * len(others.methods)
    assert {m for m, _, _ in grid} == set(METHODS)
    assert len(set(grid)) == len(grid)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "data.nme=x"], "unknown key data.nme"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
        (["--methods", "baseline,gc_x"], "unknown method(s) ['gc_x']"),
    ],
)
def test_bad_runner_arguments_are_clear_errors(argv, message, capsys, tmp_path):
    from experiments.suites.compare import main

    with pytest.raises(SystemExit) as exc:
        main(["--suite", "cpu-fmnist", "--out", str(tmp_path), "--list", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_scale_only_control_replays_the_gradient_modes_measured_ratio(tmp_path):
    import json

    from experiments.suites.compare import MATCHED_SCALE, matched_control_scale, run_dir

    assert MATCHED_SCALE == {"gc_ode_scale_only": "gc_ode_gradient"}
    grid = suites()["cpu-fmnist"].grid()
    first = {c: i for i, c in reversed(list(enumerate(grid)))}
    for control, source in MATCHED_SCALE.items():  # the source runs come first in the grid
        for m, b, s in grid:
            if m == control:
                assert first[(source, b, s)] < first[(m, b, s)]
    directory = run_dir(tmp_path, "gc_ode_gradient", 1.0, 0)
    directory.mkdir(parents=True)
    metrics = directory / "metrics.jsonl"
    with pytest.raises(RuntimeError, match="has not finished"):
        matched_control_scale(tmp_path, "gc_ode_gradient", 1.0, 0)
    records = [
        {"kind": "epoch", "epoch": 1, "step": 30, "gc_ode_grad_ratio": 1.0},
        {"kind": "epoch", "epoch": 2, "step": 40, "gc_ode_grad_ratio": 1.5},  # 10 steps
        {"kind": "summary", "status": "completed"},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert matched_control_scale(tmp_path, "gc_ode_gradient", 1.0, 0) == pytest.approx(
        (30 * 1.0 + 10 * 1.5) / 40
    )
    metrics.write_text(
        json.dumps(records[0] | {"gc_ode_grad_ratio": None}) + "\n" + json.dumps(records[2]) + "\n"
    )
    with pytest.raises(RuntimeError, match="logged no gc_ode_grad_ratio"):
        matched_control_scale(tmp_path, "gc_ode_gradient", 1.0, 0)


def test_a_misspelt_method_option_fails_before_the_first_run(monkeypatch, capsys, tmp_path):
    import dataclasses

    from experiments.suites import compare

    bad = dataclasses.replace(
        suites()["cpu-fmnist"], method_overrides={"gc_w": ("corrections.gc_w.warmpu=24",)}
    )
    monkeypatch.setitem(compare.suites(), "cpu-fmnist", bad)
    with pytest.raises(SystemExit) as exc:
        compare.main(["--suite", "cpu-fmnist", "--out", str(tmp_path), "--max-runs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "method gc_w of suite cpu-fmnist" in err and "unknown option 'warmpu'" in err
    assert "did you mean 'warmup'" in err and not (tmp_path / "runs").exists()


_IMPORT_WITHOUT_READING = """
import tomllib

def refuse(*args, **kwargs):
    raise AssertionError("a suite definition was read at import")

tomllib.loads = refuse
from experiments.suites import compare
from experiments.suites.compare import suites
assert compare.suites.cache_info().currsize == 0
print("not read")
"""


def test_importing_the_runner_reads_no_suite_definition():
    """The suite TOMLs are read on first use (``compare.suites()``, cached), not at import:
    a process that reads one would fail here (``tomllib.loads`` refuses)."""
    import subprocess
    import sys

    from experiments import REPO

    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_READING],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "not read"


def test_suites_are_read_once():
    from experiments.suites import compare

    every = compare.suites()
    assert compare.suites() is every  # cached: read once per process
    assert set(every) == {compare.load_suite(p).name for p in compare.SUITE_DIR.glob("*.toml")}
