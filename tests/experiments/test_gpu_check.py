"""experiments/gpu_check.sh --dry-run (the GPU check's code on the CPU, tiny sizes), the
preflight's failure line, the schedule planner and the main stage's suite folder."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from experiments import gpu_check
from experiments.suites.report import load_runs, run_dir

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "gpu_check.log",
    "preflight.json",
    "tests.txt",
    "bench.json",
    "bench.md",
    "main.json",
    "main.md",
    "main.tar.gz",
}


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path, tmp_path_factory):
    env = {**os.environ, "OUT": str(tmp_path), "GCGD_PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    env.pop("GCGD_SUITE_DIR", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,  # a loaded CI machine: the dry run is not cut at its deadline
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the device tool brings back at most 8 files of $OUT: the suite travels as an archive
    assert {p.name for p in tmp_path.iterdir()} == FILES
    assert all(p.is_file() for p in tmp_path.iterdir())
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert "failed" not in pre and all(s["ok"] for s in pre["stages"])
    assert pre["versions"]["jax"]
    assert "1 passed" in (tmp_path / "tests.txt").read_text()
    bench = json.loads((tmp_path / "bench.json").read_text())
    ours = [r for r in bench["rows"] if r.get("framework") == "jax"]
    assert sorted(r["replicas"] for r in ours) == [1, 1, 2], bench["rows"]
    assert all(r["step_s_median"] > 0 for r in ours)

    # The main stage: the suite run by its own runner, arm by arm, at the chosen schedule.
    main = json.loads((tmp_path / "main.json").read_text())
    assert main["schedule"].startswith("SHORTENED")
    assert main["total_steps"] == gpu_check.DRY_STEPS
    assert main["suite_command"].startswith(
        "python -m experiments.suites.compare --suite gpu-cifar10-resnet20 --seeds 2 "
        "--seed-parallel --set "
    )
    assert main["suite_command"].endswith(f"--set train.total_steps={gpu_check.DRY_STEPS}")
    assert list(main["arms"]) == ["baseline@1", "gcgd@1", "baseline@0.8", "gcgd@0.8"]
    assert all(a["exit_code"] == 0 and a["wall_s"] > 0 for a in main["arms"].values())
    calib = main["calibration"]
    assert set(calib["step_s"]) == {"baseline", "gcgd"} and calib["process_s"] > 0
    assert main["machine"]["backend"] == "cpu"

    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(tmp_path / "main.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    suite_dir = unpacked / gpu_check.SUITE
    assert {p.name for p in unpacked.iterdir()} == {gpu_check.SUITE}
    report = (suite_dir / "RESULTS.md").read_text()
    assert (tmp_path / "main.md").read_text() == report  # main.md: the suite's report
    assert report.startswith(f"# Suite {gpu_check.SUITE}\n")
    assert "**Schedule: SHORTENED" in report and main["suite_command"] in report
    assert "## Final test accuracy at 100% budget" in report and "## Budget sweep" in report
    assert all((suite_dir / f"{name}.png").is_file() for name in ("accuracy_vs_epoch", "overhead"))
    runs = load_runs(suite_dir)
    cells = {(m, b, s) for m in ("baseline", "gcgd") for b in (0.8, 1.0) for s in (0, 1)}
    assert {(r.method, r.budget, r.seed) for r in runs} == cells
    for r in runs:
        assert r.folder == run_dir(suite_dir, r.method, r.budget, r.seed)
        assert r.summary["status"] == "completed" and r.summary["replicas"] == 2
        assert r.info["exit_code"] == 0 and r.info["note"].startswith("seed-parallel group")
        assert (r.folder / "config.toml").is_file() and not (r.folder / "checkpoints").exists()
    assert not list(suite_dir.rglob(".lock"))


def test_preflight_stops_at_the_first_failure_naming_versions(tmp_path, monkeypatch, capsys):
    from gcgd_jax.train import Trainer

    def broken(self, **kwargs):
        raise TypeError("an API that changed")

    monkeypatch.setattr(Trainer, "run", broken)
    assert gpu_check.preflight(tmp_path, dry=True) == 1
    record = json.loads((tmp_path / "preflight.json").read_text())
    line = record["failed"]
    assert line.startswith("PREFLIGHT FAILED at train step: baseline: TypeError: an API")
    assert f"jax {record['versions']['jax']}" in line and "flax" in line
    assert "test_gpu_check.py" in line or "trainer" in line or "gpu_check" in line
    assert [s["ok"] for s in record["stages"]] == [True, True, False]
    assert "PREFLIGHT FAILED" in capsys.readouterr().out


def test_plan_steps_fits_the_time_and_caps_at_he_et_al():
    step_s = {"baseline": 0.01, "gcgd": 0.015}
    compile_s = {"baseline": 20.0, "gcgd": 40.0}
    steps = gpu_check.plan_steps(300.0, step_s, compile_s, 390)
    used = 2 * sum(compile_s.values()) + 1.8 * steps * sum(step_s.values()) * 1.10
    assert steps > 0 and used <= 300.0 < used + 1.8 * sum(step_s.values()) * 1.10 + 1e-9
    assert gpu_check.plan_steps(1e9, step_s, compile_s, 390) == gpu_check.HE_STEPS
    assert gpu_check.plan_steps(50.0, step_s, compile_s, 390) == 0


def test_plan_steps_counts_each_runs_process_start():
    step_s = {"baseline": 0.01, "gcgd": 0.015}
    compile_s = {"baseline": 20.0, "gcgd": 40.0}
    steps = gpu_check.plan_steps(300.0, step_s, compile_s, 390, process_s=10.0)
    used = 2 * (sum(compile_s.values()) + 2 * 10.0) + 1.8 * steps * sum(step_s.values()) * 1.10
    assert steps > 0 and used <= 300.0 < used + 1.8 * sum(step_s.values()) * 1.10 + 1e-9
    assert steps < gpu_check.plan_steps(300.0, step_s, compile_s, 390)


def test_main_stage_refuses_a_suite_folder_holding_runs(tmp_path, capsys):
    suite_dir = tmp_path / "suite"
    (run_dir(suite_dir, "baseline", 1.0, 0)).mkdir(parents=True)
    code = gpu_check.main_event(tmp_path / "out", True, 0.0, 2, None, suite_dir)
    assert code == 2 and "give a fresh --suite-dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pack_leaves_out_checkpoints_and_locks(tmp_path):
    folder = tmp_path / "suite"
    run = run_dir(folder, "baseline", 1.0, 0)
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "checkpoints" / "4" / "state").write_text("x")
    (run / ".lock").write_text("")
    (run / "metrics.jsonl").write_text("{}\n")
    (folder / "RESULTS.md").write_text("# report\n")
    dest = tmp_path / "out" / "main.tar.gz"
    dest.parent.mkdir()
    gpu_check.pack(folder, dest)
    with tarfile.open(dest) as tar:
        names = {n for n in tar.getnames() if not tar.getmember(n).isdir()}
    assert names == {"suite/RESULTS.md", "suite/runs/baseline/b1/s0/metrics.jsonl"}
    assert [p.name for p in dest.parent.iterdir()] == ["main.tar.gz"]


def test_main_stage_cut_at_its_deadline_keeps_the_arms_that_finished(tmp_path, monkeypatch):
    """Arms that no longer fit before the deadline are skipped; the report, the record and the
    archive hold the arms that finished (the runs and the clock are stand-ins: each arm takes
    1.5 times its planned seconds)."""
    from types import SimpleNamespace

    from experiments.suites import compare

    now = [1000.0]
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(time=lambda: now[0]))
    calibration = {
        "machine": {"cpu": "test", "device": "gpu: test"},
        "import_s": 1.0,
        "data_reload_s": 0.0,
        "data_load_s": 0.0,
        "train_examples": 1280,
        "steps_per_epoch": 10,
        "step_s": {"baseline": 0.01, "gcgd": 0.02},
        "first_step_s": {"baseline": 1.0, "gcgd": 2.0},
    }
    monkeypatch.setattr(gpu_check, "run_calibration", lambda spec, limit: (calibration, ""))
    suites = []

    def run_seeds(suite, method, budget, seeds, out):
        suites.append(suite)
        planned = (1.0 + 5.0) + calibration["first_step_s"][method]
        planned += budget * 1000 * calibration["step_s"][method] * 1.10
        now[0] += 1.5 * planned
        record = {"exit_code": 0, "wall_s": 1.5 * planned, "peak_rss_mib": 100.0, "command": "x"}
        for s in seeds:
            folder = run_dir(out, method, budget, s)
            folder.mkdir(parents=True)
            acc = 0.5 + 0.1 * budget + 0.01 * s
            lines = [
                {
                    "kind": "epoch",
                    "epoch": 1,
                    "step": 10,
                    "test_acc": acc,
                    "step_time_median": 0.01,
                },
                {"kind": "summary", "status": "completed", "step_time_median": 0.01},
            ]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            (folder / "run.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(compare, "run_seeds", run_seeds)
    out, suite_dir = tmp_path / "out", tmp_path / "elsewhere" / gpu_check.SUITE
    # 15 s of margin, 4 arms of 1000 steps at budget 1.0 exactly (gpu_check.plan_steps)
    deadline = 1000.0 + 15.0 + 2 * (3.0 + 2 * 6.0) + 1.8 * 0.03 * 1.10 * 1000 + 0.01
    assert gpu_check.main_event(out, False, deadline, 2, None, suite_dir) == 0
    main = json.loads((out / "main.json").read_text())
    assert main["total_steps"] == 1000 and main["schedule"].startswith("SHORTENED: 1000 steps")
    assert all("train.total_steps=1000" in s.overrides for s in suites)
    done = ["baseline@1", "gcgd@1", "baseline@0.8"]
    assert [a for a, r in main["arms"].items() if r.get("exit_code") == 0] == done
    assert main["arms"]["gcgd@0.8"]["skipped"].startswith("out of time")
    report = (out / "main.md").read_text()
    assert report == (suite_dir / "RESULTS.md").read_text() and "SHORTENED: 1000 steps" in report
    with tarfile.open(out / "main.tar.gz") as tar:
        metrics = sorted(n for n in tar.getnames() if n.endswith("metrics.jsonl"))
    assert metrics == sorted(
        f"{gpu_check.SUITE}/runs/{a.split('@')[0]}/b{a.split('@')[1]}/s{s}/metrics.jsonl"
        for a in done
        for s in (0, 1)
    )
    assert sorted(p.name for p in out.iterdir()) == ["main.json", "main.md", "main.tar.gz"]
