"""The report builder reads run folders and writes tables and plots."""

import json

import numpy as np

from experiments.suites.report import build_report, fmt_reading, load_runs, pct, pp, pp_ci
from experiments.suites.stats import BudgetReading, paired


def _write_run(root, method, budget, seed, accs, step_time, complete=True):
    d = root / "runs" / method / f"b{budget}" / f"s{seed}"
    d.mkdir(parents=True)
    lines = [
        json.dumps({"kind": "epoch", "epoch": i + 1, "test_acc": a, "step_time_median": step_time})
        for i, a in enumerate(accs)
    ]
    if complete:
        lines.append(json.dumps({"kind": "summary", "step_time_median": step_time}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "run.json").write_text(json.dumps({"peak_rss_mib": 500.0}))


def test_report_tables_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        for b in (0.5, 1.0):
            base = 0.80 + 0.05 * b + rng.normal(0, 0.002)
            _write_run(tmp_path, "baseline", b, seed, [0.5, base], 0.10)
            _write_run(tmp_path, "better", b, seed, [0.6, base + 0.05], 0.12)
    _write_run(tmp_path, "baseline", 1.0, 9, [0.5], 0.1, complete=False)  # skipped: incomplete

    runs = load_runs(tmp_path)
    assert len(runs) == 12
    text = build_report(tmp_path, title="t")
    assert "| baseline | 3 |" in text
    assert "| better | 3 |" in text
    # 'better' reaches the baseline's full-budget accuracy already at half the budget
    # (the smallest run: censored), on all 3 paired seeds.
    better_row = next(line for line in text.splitlines() if line.startswith("| better | 3 | 8"))
    assert "| ≥ 50% [50%, 50%] |" in better_row
    assert "1.20×" in text  # step-time ratio 0.12 / 0.10
    for png in ("accuracy_vs_epoch.png", "budget_sweep.png", "overhead.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_conclusions_follow_the_confidence_intervals(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(5):
        for b in (0.5, 1.0):
            base = 0.80 + 0.05 * b + rng.normal(0, 0.002)
            _write_run(tmp_path, "baseline", b, seed, [0.5, base], 0.10)
            _write_run(tmp_path, "better", b, seed, [0.6, base + 0.05], 0.12)
            _write_run(tmp_path, "noise", b, seed, [0.5, base + rng.normal(0, 0.002)], 0.10)
        _write_run(tmp_path, "worse", 1.0, seed, [0.5, 0.70 + rng.normal(0, 0.002)], 0.10)
    (tmp_path / "DISCUSSION.md").write_text("## Discussion\n\nhand-written reading\n")
    text = build_report(tmp_path, title="t")
    lines = text.splitlines()
    higher = next(x for x in lines if x.startswith("- Higher final accuracy"))
    lower = next(x for x in lines if x.startswith("- Lower"))
    same = next(x for x in lines if x.startswith("- No difference"))
    assert "better" in higher and "worse" not in higher and "noise" not in higher
    assert "worse" in lower and "better" not in lower
    assert "noise" in same
    assert any(x.startswith("- better: epoch saving ≥ 50% [50%, 50%]") for x in lines)
    # the worse method, run at the full budget only, is compared on its paired seeds
    worse_row = next(x for x in lines if x.startswith("| worse | 5 |"))
    assert "| 5 | -" in worse_row and "| − |" in worse_row
    assert "hand-written reading" in text


def test_report_uses_step_ratios_measured_alone_for_wall_clock(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        for b in (0.5, 1.0):
            base = 0.80 + 0.05 * b + rng.normal(0, 0.002)
            _write_run(tmp_path, "baseline", b, seed, [0.5, base], 0.10)
            _write_run(tmp_path, "better", b, seed, [0.6, base + 0.05], 0.10)
    text = build_report(tmp_path, title="t")
    assert "wall-clock saving ≥ +50%" in text  # in-suite ratio 1.00x
    overhead = {"meta": {}, "methods": {"baseline": {"ratio": 1.0}, "better": {"ratio": 1.5}}}
    (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    text = build_report(tmp_path, title="t")
    assert "wall-clock saving ≥ +25%" in text  # 1 - 0.5 x 1.5
    assert "| 1.50× |" in text


def test_report_pairs_seeds(tmp_path):
    """A method run on seeds 0-2 is compared with baseline seeds 0-2 only."""
    offsets = [0.00, 0.10, 0.05, 0.30, 0.30]  # baseline seeds 3, 4 are far better
    for seed, off in enumerate(offsets):
        _write_run(tmp_path, "baseline", 1.0, seed, [0.5, 0.5 + off], 0.1)
    for seed in range(3):  # +1 pp on each of its seeds 0-2
        _write_run(tmp_path, "paired_gain", 1.0, seed, [0.5, 0.51 + offsets[seed]], 0.1)
    text = build_report(tmp_path, title="t")
    row = next(x for x in text.splitlines() if x.startswith("| paired_gain |"))
    cols = [c.strip() for c in row.split("|")]
    assert cols[4] == "3"  # paired seeds
    assert cols[5].startswith("+1.00 [+1.00, +1.00]")  # not -10.0 from unmatched seeds
    assert cols[8] == "+"


def _verdict(text, method):
    row = next(x for x in text.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in row.split("|")][8]


def test_report_verdicts_are_holm_corrected(tmp_path):
    # Paired differences (0.01, 0.03, 0.0, 0.02, 0.02): t = 3.14 with 4 df, p = 0.035 --
    # significant alone, not once two more methods share the 5% (Holm: 0.05/3 first).
    diffs = (0.01, 0.03, 0.0, 0.02, 0.02)
    for seed, d in enumerate(diffs):
        _write_run(tmp_path, "baseline", 1.0, seed, [0.5, 0.6 + 0.01 * seed], 0.1)
        _write_run(tmp_path, "borderline", 1.0, seed, [0.5, 0.6 + 0.01 * seed + d], 0.1)
    text = build_report(tmp_path, title="t")
    assert "| 0.0349 |" in text
    assert _verdict(text, "borderline") == "+"
    for name in ("null_a", "null_b"):
        for seed in range(5):
            _write_run(
                tmp_path, name, 1.0, seed, [0.5, 0.6 + 0.01 * seed + 0.01 * (-1) ** seed], 0.1
            )
    text = build_report(tmp_path, title="t")
    assert _verdict(text, "borderline") == "="
    assert "borderline" in next(x for x in text.splitlines() if x.startswith("- No difference"))


def test_one_set_of_formatters_writes_both_reports_styles():
    assert (pct(0.5), pct(0.7234, 2), pct(None)) == ("50%", "72.34%", "—")
    assert (pp(1.234), pp(-0.5), pp(float("inf")), pp(float("nan"))) == ("+1.23", "-0.50", "∞", "∞")
    # Differences of fractions (scale 100), or already in percentage points (the long report).
    c = paired({0: 0.72, 1: 0.74, 2: 0.75}, {0: 0.71, 1: 0.72, 2: 0.73})
    assert pp_ci(c, scale=100) == f"+1.67 [{pp(100 * c.t_low)}, {pp(100 * c.t_high)}]"
    assert pp_ci(paired({0: 72.0}, {0: 71.5})) == "+0.50 (n = 1)"
    # A budget reading: the budget-sweep report's style, and the long report's (compact).
    reading = BudgetReading(0.5, "≥", 0.3, 0.5)
    assert fmt_reading(reading) == "≥ 50% [30%, 50%]"
    assert fmt_reading(reading, compact=True) == "≥50% [30%, 50%]"
    assert fmt_reading(BudgetReading(0.8, "", 0.7, None)) == "80% [70%, —]"
    unreached = BudgetReading(None, "not reached", None, 0.6)
    assert fmt_reading(unreached) == "not reached [—, 60%]"
    assert fmt_reading(unreached, compact=True) == "not reached"
