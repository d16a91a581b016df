"""The comparison suites' grids and method overrides are valid training configurations."""

import pytest

from experiments.compare import METHODS, SUITES, quick
from gcgd_jax.train import load_config


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_cell_of_every_suite_is_a_valid_config(suite):
    for s in (SUITES[suite], quick(SUITES[suite])):
        for method, budget, seed in s.grid():
            overrides = (*s.overrides_for(method), f"run.seed={seed}", f"train.budget={budget}")
            cfg = load_config(s.base_config, overrides)
            assert cfg.train.budget == budget and cfg.run.seed == seed


def test_grid_sizes_follow_the_protocol():
    s = SUITES["cpu-fmnist"]
    grid = s.grid()
    # 5 seeds x 6 budgets (0.5 ... 1.0) for the core methods, 3 seeds at 100% for the others.
    assert s.budgets == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert len(grid) == 5 * 6 * len(s.core) + 3 * len(s.others)
    assert {m for m, _, _ in grid} == set(METHODS)
    assert len(set(grid)) == len(grid)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "data.nme=x"], "unknown key data.nme"),
        (["--core-seeds", "-1"], "--core-seeds must be >= 0"),
        (["--methods", "baseline,gc_x"], "unknown method(s) ['gc_x']"),
    ],
)
def test_bad_runner_arguments_are_clear_errors(argv, message, capsys, tmp_path):
    from experiments.compare import main

    with pytest.raises(SystemExit) as exc:
        main(["--suite", "cpu-fmnist", "--out", str(tmp_path), "--list", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was started
