"""Suite definitions (``experiments/suites/*.toml``), the pre-registered ``cpu-cifar10-long``
suite, the clean-tree rule, and its report on fabricated runs with known statistics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.stats

from experiments.suites import compare, long_report
from experiments.suites.compare import load_suite, suites
from gcgd_jax.train import load_config

LONG = suites()["cpu-cifar10-long"]


def test_every_suite_definition_names_its_setting_and_time():
    assert set(suites()) >= {
        "cpu-fmnist",
        "cpu-cifar10",
        "cpu-cifar10-long",
        "gpu-cifar10-resnet20",
    }
    for s in suites().values():
        assert s.paper_setting and s.expected_time, s.name
        assert (compare.SUITE_DIR / f"{s.name}.toml").exists()


def test_long_suite_follows_the_protocol():
    cfg = load_config(LONG.base_config, list(LONG.overrides))
    assert (cfg.data.train_subset, cfg.data.val_fraction, cfg.data.eval_split) == (
        10240,
        0.1,
        "val",
    )
    assert cfg.train.final_test and cfg.data.test_subset is None
    assert cfg.train.epochs * (10240 // cfg.data.batch_size) == 1600
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == (0.9, 5e-4, 1.0)
    assert LONG.report == "long" and LONG.require_clean
    assert LONG.method_overrides == {}  # every method at its documented defaults
    assert "Primary endpoint" in LONG.preregistration
    grid = LONG.grid()
    # The baseline's sanity cells first, then GCGD: a partial campaign answers the primary first.
    assert grid[:10] == [("baseline", b, s) for s in range(5) for b in (1.0, 0.8)]
    assert set(grid[10:20]) == {("gcgd", b, s) for s in range(5) for b in (0.8, 1.0)}
    assert len(grid) == 57 and len(set(grid)) == 57
    # The scale-only control comes after the gradient-mode run it replays.
    assert grid.index(("gc_ode_gradient", 1.0, 0)) < grid.index(("gc_ode_scale_only", 1.0, 0))


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "x"\nbase_config = "quickstart"\ndescription = "d"\n', "no [[grid]] phase"),
        ('name = "x"\nbase_confg = "q"\n', "unknown key(s) ['base_confg']"),
        (
            (
                'name = "x"\nbase_config = "q"\ndescription = "d"\n'
                '[[grid]]\nmethods = ["gc_x"]\nbudgets = [1.0]\nseeds = 1\n'
            ),
            "unknown method(s) ['gc_x']",
        ),
        (
            'name = "x"\nbase_config = "q"\ndescription = "d"\n[[grid]]\nmethods = ["gc_w"]\n',
            "grid[0] needs exactly methods, budgets, seeds",
        ),
        (
            (
                'name = "x"\nbase_config = "q"\ndescription = "d"\nreport = "short"\n'
                '[[grid]]\nmethods = ["gc_w"]\nbudgets = [1.0]\nseeds = 1\n'
            ),
            "report must be one of",
        ),
    ],
)
def test_bad_suite_definitions_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="suite definition .*bad.toml") as err:
        load_suite(path)
    assert message in str(err.value)


def test_a_suite_that_requires_a_clean_tree_refuses_a_dirty_one(monkeypatch, tmp_path, capsys):
    dirty = {"commit": "abc123", "clean": False, "changed": ["gcgd_jax/methods.py"]}
    monkeypatch.setattr(compare, "tree", lambda: dirty)
    argv = ["--suite", "cpu-cifar10-long", "--out", str(tmp_path), "--max-runs", "0"]
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "differs from abc123 in: gcgd_jax/methods.py" in err and "--allow-dirty" in err
    assert not (tmp_path / "runs").exists()
    # The report can always be rebuilt; --allow-dirty lets runs go (none here: --max-runs 0).
    assert compare.main([*argv, "--report-only"]) == 0
    assert compare.main([*argv, "--allow-dirty"]) == 0
    assert "Primary endpoint: pending" in (tmp_path / "RESULTS.md").read_text()


def test_tree_state_ignores_results_being_written_but_not_code(tmp_path):
    import subprocess

    from experiments.common.provenance import tree_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    (tmp_path / "experiments" / "results" / "s").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "s" / "metrics.jsonl").write_text("{}\n")
    state = tree_state(tmp_path)
    assert state["clean"] and len(state["commit"]) == 40
    (tmp_path / "b.py").write_text("y = 2\n")  # an untracked source file is a change
    assert tree_state(tmp_path)["changed"] == ["b.py"]
    (tmp_path / "b.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert tree_state(tmp_path)["changed"] == ["a.py"]


# ---------------------------------------------------------------- the report, on known numbers

BASE_1 = [0.72, 0.73, 0.71, 0.74, 0.725]
BASE_08 = [0.70, 0.71, 0.695, 0.72, 0.705]
GCGD_08 = [0.721, 0.728, 0.712, 0.735, 0.73]


def _write_run(out, method, budget, seed, test_acc, val_curve):
    d = compare.run_dir(out, method, budget, seed)
    d.mkdir(parents=True)
    records = [
        {"kind": "epoch", "epoch": i + 1, "step": 80 * (i + 1), "val_acc": v, "epoch_time": 10.0}
        for i, v in enumerate(val_curve)
    ]
    records.append(
        {
            "kind": "summary",
            "status": "completed",
            "final_val_acc": val_curve[-1],
            "final_test_acc": test_acc,
        }
    )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "run.json").write_text(json.dumps({"commit": "f" * 40, "clean_tree": True}))


def test_long_report_draws_the_preregistered_verdict_from_the_runs(tmp_path):
    for s in range(5):
        _write_run(tmp_path, "baseline", 1.0, s, BASE_1[s], [0.5, 0.6, 0.70 + s * 0.001])
        _write_run(tmp_path, "baseline", 0.8, s, BASE_08[s], [0.5, 0.69])
        _write_run(tmp_path, "gcgd", 0.8, s, GCGD_08[s], [0.5, 0.71])
    text = long_report.build_long_report(tmp_path, LONG, notes="settings")
    first = text.splitlines()[2]

    def interval(a, b):
        d = 100 * (np.array(a) - np.array(b))
        half = scipy.stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
        return d.mean(), d.mean() - half

    mean_a, low_a = interval(GCGD_08, BASE_1)
    mean_b, low_b = interval(GCGD_08, BASE_08)
    assert low_a > -0.5 and low_b > 0  # both supported by construction
    assert first.startswith("**Primary endpoint: the ~20% claim holds here**"), first
    assert (
        f"{mean_a:+.2f} pp [{low_a:+.2f}," in first and f"{mean_b:+.2f} pp [{low_b:+.2f}," in first
    )
    # Sanity: 72.5% >= 70% and the paired gap 1.9 pp >= 1 pp.
    assert "72.50%" in text and "passes the ≥ 70% check" in text
    assert "passes the ≥ 1 pp check" in text
    # Time to result: target = median final val of baseline@1.0 (0.702); GCGD@0.8 reaches
    # it at its second evaluation (step 160) in every run, baseline@0.8 never.
    assert "70.20%" in text
    assert "| gcgd | 0.8 | 5 | 5 of 5 (100%) | 160 | 20 |" in text
    assert "| baseline | 0.8 | 5 | 0 of 5 (0%) | — | — |" in text
    assert (tmp_path / "accuracy_vs_epoch.png").stat().st_size > 0
    assert "DISCUSSION" not in text  # no discussion written: none linked
    # A hand-written discussion is linked, not copied in: the docs site shows it once.
    (tmp_path / "DISCUSSION.md").write_text("# the discussion\n\nA sentence only it has.\n")
    text = long_report.build_long_report(tmp_path, LONG)
    assert "[`DISCUSSION.md`](DISCUSSION.md)" in text and "A sentence only it has" not in text
    # A worse GCGD fails (b): the verdict turns, from the same code.
    for s in range(5):
        shutil.rmtree(compare.run_dir(tmp_path, "gcgd", 0.8, s))
        _write_run(tmp_path, "gcgd", 0.8, s, BASE_08[s] + 0.001 * (-1) ** s, [0.5, 0.69])
    text = long_report.build_long_report(tmp_path, LONG)
    assert text.splitlines()[2].startswith(
        "**Primary endpoint: the ~20% claim does not hold here**"
    )


def test_long_report_draws_no_verdict_from_a_partial_grid(tmp_path):
    for s in range(3):
        _write_run(tmp_path, "baseline", 1.0, s, BASE_1[s], [0.7])
        _write_run(tmp_path, "baseline", 0.8, s, BASE_08[s], [0.7])
        _write_run(tmp_path, "gcgd", 0.8, s, GCGD_08[s], [0.7])
    text = long_report.build_long_report(tmp_path, LONG)
    assert "**Primary endpoint: pending.**" in text
    assert "Pending: baseline@1.0 3 of 5 seeds" in text


def test_long_report_carries_the_budget_readings_into_wall_clock(tmp_path):
    # Every seed shifts every cell by the same offset: the paired bootstrap intervals
    # collapse onto the readings, which are then known exactly (piecewise linear curves).
    base = {0.6: 0.60, 0.8: 0.70, 1.0: 0.75}
    runs = {("baseline", b): (acc, [0.5, acc]) for b, acc in base.items()} | {
        ("centralize", 0.8): (0.75, [0.6, 0.76]),  # reaches 75% at 80%: epoch saving 20%
        ("centralize", 1.0): (0.78, [0.6, 0.78]),
        ("gcgd", 0.8): (0.70, [0.5, 0.70]),
        ("gcgd", 1.0): (0.725, [0.5, 0.72]),  # the baseline's curve: 90% of its budget
        ("gc_w", 1.0): (0.74, [0.5, 0.74]),  # run at 100% only: 96%
    }
    for s in range(5):
        for (m, b), (acc, val) in runs.items():
            if m != "gc_w" or s < 3:
                _write_run(tmp_path, m, b, s, acc + 0.002 * s, [v + 0.002 * s for v in val])
    without = long_report.build_long_report(tmp_path, LONG)
    assert "Pending: no step costs measured alone yet" in without
    costs = {"baseline": (0.4, 1.0), "centralize": (0.5, 1.25), "gcgd": (0.6, 1.5)}
    costs["gc_w"] = (0.48, 1.2)
    (tmp_path / "overhead.json").write_text(
        json.dumps(
            {
                "meta": {},
                "methods": {m: {"step_s_median": t, "ratio": r} for m, (t, r) in costs.items()},
            }
        )
    )
    text = long_report.build_long_report(tmp_path, LONG)
    assert "| gcgd | 5 | 90% [90%, 90%] | not reached | 0.00 |" in text
    assert "| gc_w | 3 | 96% [96%, 96%] | not reached | 0.00 |" in text
    # centralize reaches at its smallest budget run: the saving is censored there (≥).
    assert "| centralize | 5 | ≥100% [100%, 100%] | ≥20% [20%, 20%] | 1.00 |" in text
    # Wall-clock: gcgd 90% / 1.5 = 60%; gc_w 96% / 1.2 = 80%; centralize saves
    # 1 - (1 - 20%) x 1.25 = 0% of the baseline's time, its equivalent >= 100% / 1.25 = 80%.
    assert "| gcgd | 1.500× | 60% [60%, 60%] | not reached |" in text
    assert "| gc_w | 1.200× | 80% [80%, 80%] | not reached |" in text
    assert "| centralize | 1.250× | ≥80% [80%, 80%] | ≥0% [0%, 0%] |" in text
    # Time to result at the step cost measured alone: the target is 75% + 0.004 (median
    # seed); centralize@0.8 reaches it at step 160 (160 x 0.5 s), the baseline never does
    # on 3 of 5 seeds (its seeds 2-4 reach it at step 160: 160 x 0.4 s).
    assert "| centralize | 0.8 | 5 | 5 of 5 (100%) | 160 | 20 | 80 |" in text
    assert "| baseline | 1 | 5 | 3 of 5 (60%) | 160 | 20 | 64 |" in text


@pytest.mark.parametrize(
    "content", ['{"meta": {}}', '{"methods": {"baseline": {"step_s_median": 0.4}}}']
)
def test_a_malformed_overhead_file_is_named_in_the_error(tmp_path, content):
    (tmp_path / "overhead.json").write_text(content)
    with pytest.raises(ValueError, match=r"overhead\.json: expected a 'methods' table"):
        long_report.build_long_report(tmp_path, LONG)


def test_long_report_ranges_the_methods_diagnostics_over_runs(tmp_path):
    for s in range(3):
        _write_run(tmp_path, "baseline", 1.0, s, BASE_1[s], [0.5, 0.7])
        _write_run(tmp_path, "gc_ode_gradient", 1.0, s, BASE_1[s], [0.5, 0.7])
        path = compare.run_dir(tmp_path, "gc_ode_gradient", 1.0, s) / "metrics.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines()]
        records[0] |= {"gc_ode_gate": 0.15 + 0.01 * s, "gc_ode_grad_ratio": 0.95}
        records[1] |= {"gc_ode_gate": 0.30 + 0.005 * s, "gc_ode_grad_ratio": 0.8 + 0.02 * s}
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = long_report.build_long_report(tmp_path, LONG)
    assert "## Method diagnostics (epoch records)" in text
    assert "| gc_ode_gradient | 1 | 3 | `gc_ode_gate` | 0.15 – 0.17 | 0.3 – 0.31 |" in text
    assert "| gc_ode_gradient | 1 | 3 | `gc_ode_grad_ratio` | 0.95 | 0.8 – 0.84 |" in text
    # The common epoch keys (val_acc, epoch_time, ...) are no method's diagnostics.
    assert "`val_acc`" not in text and "| baseline | 1 | 3 | `" not in text


def test_long_report_reads_gcgd_against_its_parts_as_exploratory(tmp_path):
    # Per seed: baseline b, GC-W b - 0.5 pp, GC-ODE b + 0.2 pp, GCGD b - 1.0 pp + seed x 0.1 pp:
    # the parts add up to -0.3 pp, so the interaction is -0.7, -0.6, -0.5 pp.
    for s in range(3):
        b = BASE_1[s]
        for m, acc in (
            ("baseline", b),
            ("gc_w", b - 0.005),
            ("gc_ode_gradient", b + 0.002),
            ("gcgd", b - 0.010 + 0.001 * s),
        ):
            _write_run(tmp_path, m, 1.0, s, acc, [0.5, 0.7])
    text = long_report.build_long_report(tmp_path, LONG)
    assert "## Exploratory: GCGD against its parts (not pre-registered)" in text
    assert "| GCGD − GC-W v1 alone | 0, 1, 2 | -0.40 [" in text
    assert "| -0.50, -0.40, -0.30 |" in text
    row = next(x for x in text.splitlines() if x.startswith("| interaction"))
    assert "| -0.60 [" in row and "| -0.70, -0.60, -0.50 |" in row
    # A row whose terms have not run (the scale-only control, GC-W v2) is left out.
    assert "scale-only control |" not in text and "GC-W v2 − GC-W v1 |" not in text


def test_a_finished_run_without_evaluated_epochs_is_named_in_the_error(tmp_path):
    _write_run(tmp_path, "baseline", 1.0, 0, BASE_1[0], [0.7])
    path = compare.run_dir(tmp_path, "baseline", 1.0, 0) / "metrics.jsonl"
    path.write_text(path.read_text().splitlines()[-1] + "\n")  # the summary record only
    with pytest.raises(ValueError, match=r"b1/s0/metrics\.jsonl: a finished run with no evaluated"):
        long_report.build_long_report(tmp_path, LONG)
