"""experiments/studies/gc_ode_matching.py: the paired summary of the backward-matching diagnostic."""

import pytest

from experiments.studies.gc_ode_matching import main, paired_t, summarize, write_outputs


def _run(seed, arm, cos, acc):
    records = [
        {"step": 4, "batch": b, "pair": 0, "cos": cos + 0.01 * b, "rel_err": 1 - cos, "gate": 0.1}
        for b in range(2)
    ]
    return {"seed": seed, "arm": arm, "final_acc": acc, "records": records}


def test_summary_pairs_seeds_and_reports_the_difference(tmp_path):
    runs = [
        _run(0, "0", 0.10, 0.30), _run(0, "1", 0.30, 0.31),
        _run(1, "0", 0.20, 0.40), _run(1, "1", 0.50, 0.40),
    ]  # fmt: skip
    (row,) = summarize(runs, ("0", "1"))
    assert row["cos@0"] == pytest.approx(0.155) and row["cos@1"] == pytest.approx(0.405)
    # paired per-seed differences +0.20 and +0.30: mean 0.25, t_1 interval 0.25 +- 12.706 * 0.05
    assert row["cos_diff"]["mean"] == pytest.approx(0.25)
    assert row["cos_diff"]["hi"] - 0.25 == pytest.approx(12.7062 * 0.05, rel=1e-4)
    assert row["rel_err_diff"]["mean"] == pytest.approx(-0.25)
    assert paired_t([0.5])["lo"] is None  # one seed: no interval
    meta = {"suite": "cpu-fmnist", "command": "x", "machine": "m", "date": "d", "commit": "c",
            "wall_s": 1.0, "seeds": [0, 1], "probe_batches": 2, "batch_size": 8,
            "compare": "model.gc_ode.sobolev_weight", "arms": ["0", "1"]}  # fmt: skip
    write_outputs(tmp_path, runs, [row], meta)
    text = (tmp_path / "GC_ODE_MATCHING.md").read_text()
    assert "| 4 | 0 | 0.155 | 0.405 | +0.250 [" in text
    assert row["gate_diff"]["mean"] == pytest.approx(0.0)
    # accuracy: +1.0 and 0.0 pp
    assert "model.gc_ode.sobolev_weight = 1 minus 0: +0.500 [" in text
    assert "seed 0: 30.00% / 31.00%" in text


@pytest.mark.parametrize(
    "compare", ["model.gc_ode.sobolev_weight", "x=1", "x=1,1", "model.no_such_key=0,1"]
)
def test_bad_compare_is_a_clear_error(compare, capsys):
    with pytest.raises(SystemExit):
        main(["--compare", compare])
    assert "--compare" in capsys.readouterr().err
