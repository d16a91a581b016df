"""experiments/gpu_check.sh --dry-run (the GPU check's code on the CPU, tiny sizes), the
preflight's failure line and the schedule planner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import gpu_check

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "gpu_check.log",
    "preflight.json",
    "tests.txt",
    "bench.json",
    "bench.md",
    "main.json",
    "main.md",
}


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GCGD_PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
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
    assert {p.name for p in tmp_path.iterdir()} == FILES  # at most 8 files come back
    pre = json.loads((tmp_path / "preflight.json").read_text())
    assert "failed" not in pre and all(s["ok"] for s in pre["stages"])
    assert pre["versions"]["jax"]
    assert "1 passed" in (tmp_path / "tests.txt").read_text()
    bench = json.loads((tmp_path / "bench.json").read_text())
    ours = [r for r in bench["rows"] if r.get("framework") == "jax"]
    assert sorted(r["replicas"] for r in ours) == [1, 1, 2], bench["rows"]
    assert all(r["step_s_median"] > 0 for r in ours)
    main = json.loads((tmp_path / "main.json").read_text())
    assert main["schedule"].startswith("SHORTENED")
    assert set(main["arms"]) == {"baseline@1.0", "baseline@0.8", "gcgd@1.0", "gcgd@0.8"}
    for arm in main["arms"].values():
        assert sorted(arm["runs"]) == ["0", "1"] or sorted(arm["runs"]) == [0, 1]
        for records in arm["runs"].values():
            assert records[-1]["kind"] == "summary" and records[-1]["status"] == "completed"
    assert "GCGD@0.8 - baseline@1.0" in main["comparisons"]
    assert "SHORTENED" in (tmp_path / "main.md").read_text()


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
