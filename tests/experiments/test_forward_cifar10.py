"""The pre-registered forward-gradient study on CIFAR-10: its definition, the chunk runner's
deadline (a run stopped by it resumes in the next chunk), the provenance of a checkout
without ``.git`` and ``experiments/gpu_study.sh --dry-run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

from experiments.common.provenance import checkout_state
from experiments.studies import study as study_module
from experiments.studies.forward_cifar10 import OUT, RUNNER, load_study, main
from experiments.studies.study import is_complete, overrides, run_dir
from gcgd_jax.train.config import load_config
from gcgd_jax.train.report import read_metrics

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["bp", "fg_a", "lg_fg_a"]
# A tiny run of the study's first cell: synthetic 8x8 images, the LocalMixer S/1/1.
TINY = [
    "data.name=synthetic",
    "data.synthetic_image_shape=[8, 8, 3]",
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=32",
    "model.mixer=S/1/1",
    "data.batch_size=16",
    "data.eval_batch_size=32",
]


def _sets(settings: list[str]) -> list[str]:
    return [a for o in settings for a in ("--set", o)]


def test_the_study_is_the_pre_registered_grid():
    study = load_study()
    tuning, grid = study.cells(0), study.cells(1)
    assert len(tuning) == 9 and {c.lr for c in tuning} == {0.03, 0.1, 0.3}
    assert {c.seed for c in tuning} == {1000} and {c.label for c in tuning} == set(VARIANTS)
    assert len(grid) == 9 and [c.label for c in grid[:3]] == VARIANTS
    assert {c.seed for c in grid} == {0, 1, 2} and len(study.phases) == 1
    assert study.benchmarks == ("cifar10",) and study.require_clean
    assert "Primary endpoint (pre-registered" in study.preregistration
    assert list(study.variants) == VARIANTS
    for label, variant in study.variants.items():  # every variant is a valid configuration
        cfg = load_config(None, [*study.base, *variant, "data.name=cifar10"])
        assert cfg.data.name == "cifar10" and cfg.model.mixer == "M/8/16", label
        assert cfg.train.epochs == 25 and cfg.data.batch_size == 100
        assert cfg.gradient.num_directions == 1 and cfg.optim.momentum == 0.0
    tune = overrides(study, tuning[0], OUT, "data.name")
    assert "data.eval_split=val" in tune and "optim.lr=0.03" in tune
    assert "data.name=cifar10" in tune


def test_a_run_cut_by_the_deadline_resumes_in_the_next_chunk(tmp_path, monkeypatch, capsys):
    """A real tiny run, stopped at the deadline after its first epoch checkpoint (a clock
    that reads 'past the deadline' once a checkpoint exists), then resumed to its end."""
    study = load_study()
    cell = study.cells(0)[0]
    folder = run_dir(tmp_path, cell.benchmark, cell.label, cell.seed, cell.lr)
    extra = _sets([*TINY, "train.epochs=30"])

    def clock() -> float:  # orbax renames a checkpoint to its step once it is complete
        saved = (folder / "checkpoints").glob("*")
        return 2.0 if any(p.name.isdigit() for p in saved) else 0.0

    fake_time = types.SimpleNamespace(time=clock, sleep=time.sleep, perf_counter=time.perf_counter)
    monkeypatch.setattr(study_module, "time", fake_time)
    record = RUNNER.run_one(study, cell, tmp_path, extra, deadline=1.0)
    log = (folder / "run.log").read_text()
    assert record["interrupted"] and record["exit_code"] != 0, log
    assert not is_complete(folder) and (folder / "checkpoints").is_dir()
    assert json.loads((folder / "run.json").read_text())["interrupted"] is True
    monkeypatch.undo()

    # No run starts after the deadline: the chunk ends at once, with exit 0.
    args = ["--out", str(tmp_path), "--no-report", "--allow-dirty", *extra]
    assert main([*args, "--deadline", str(time.time() - 1)]) == 0
    out = capsys.readouterr().out
    assert "deadline: 18 runs of this chunk not started" in out and "0 of 18 runs done" in out

    # The next chunk resumes it from its checkpoint to the end.
    assert main([*args, "--max-runs", "1", "--deadline", str(time.time() + 600)]) == 0
    assert "1 of 18 runs done" in capsys.readouterr().out
    records = read_metrics(folder / "metrics.jsonl")
    resume = [r for r in records if r.get("kind") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] > 0, (folder / "run.log").read_text()
    assert records[-1]["kind"] == "summary" and records[-1]["epochs"] == 30
    epochs = [r["epoch"] for r in records if r.get("kind") == "epoch"]
    assert epochs == list(range(1, 31))  # cut back to the checkpoint, then continued
    final = json.loads((folder / "run.json").read_text())
    assert final["exit_code"] == 0 and not final["interrupted"] and "--resume" in final["command"]
    assert [e["interrupted"] for e in final["earlier"]] == [True]


def test_a_copy_without_git_takes_its_commit_from_gcgd_commit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GCGD_COMMIT", "a" * 40)
    state = checkout_state(tmp_path)  # tmp_path: no .git
    assert state == {
        "commit": "a" * 40,
        "clean": True,
        "changed": [],
        "commit_source": "GCGD_COMMIT",
    }
    monkeypatch.delenv("GCGD_COMMIT")
    state = checkout_state(tmp_path)
    assert state["commit"] is None and not state["clean"] and state["commit_source"] is None

    # Neither .git nor GCGD_COMMIT: the study refuses to run, saying what to do.
    monkeypatch.setattr(study_module, "_tree", lambda: state)
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path), "--max-runs", "0", "--no-report"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "has no .git" in err and "GCGD_COMMIT" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_in_a_git_checkout_git_says_the_commit(tmp_path, monkeypatch):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setenv("GCGD_COMMIT", "a" * 40)
    state = checkout_state(tmp_path)
    assert state["commit"] == git("rev-parse", "HEAD") and state["commit_source"] == "git"
    assert state["clean"]


def test_gpu_study_dry_run_cuts_resumes_and_packs(tmp_path, tmp_path_factory):
    """``gpu_study.sh forward_cifar10 --dry-run`` (~40 s): three tiny chunks on the CPU, the
    runs back as one archive in $OUT with the log."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GCGD_PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_study.sh"), "forward_cifar10", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"forward_cifar10_runs.tar.gz", "gpu_study.log"}
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(out / "forward_cifar10_runs.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    study = load_study()
    first, second = study.cells(0)[:2]
    done = run_dir(unpacked, first.benchmark, first.label, first.seed, first.lr)
    cut = run_dir(unpacked, second.benchmark, second.label, second.seed, second.lr)
    assert is_complete(done) and not (done / "checkpoints").exists()
    record = json.loads((done / "run.json").read_text())
    assert [e["interrupted"] for e in record["earlier"]] == [True] and not record["interrupted"]
    assert json.loads((cut / "run.json").read_text())["interrupted"] is True
    assert not is_complete(cut) and (cut / "checkpoints").is_dir()
    log = (out / "gpu_study.log").read_text()
    carried = cut.relative_to(unpacked) / "checkpoints"
    assert f"the next chunk carries experiments/results/forward_cifar10/{carried}" in log
    assert "1 of 18 runs of the study finished" in log


def _fake_grid_run(out, label, seed, errors):
    """A finished grid run with ``errors`` (%) as its per-epoch test-error curve."""
    folder = run_dir(out, "cifar10", label, seed)
    folder.mkdir(parents=True)
    epochs = [
        {"kind": "epoch", "test_acc": 1 - e / 100, "train_loss": 1.0, "step_time_median": t}
        for e, t in zip(errors, [0.01 * (1 + VARIANTS.index(label))] * len(errors), strict=True)
    ]
    records = [*epochs, {"kind": "summary", "status": "completed"}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps({"machine": "test machine", "load_avg": [1.0]}))


def test_the_report_puts_the_endpoint_first(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.studies.forward_cifar10_report import build_report, verdict_noninferior

    study = load_study()
    finals = {"bp": 38.0, "fg_a": 60.0, "lg_fg_a": 38.5}
    for label, final in finals.items():
        for seed in range(3):
            # BP's curve is lowest at epoch 2 (it overfits), the others fall to the end
            curve = (
                [final + 5, final - 1, final] if label == "bp" else [final + 5, final + 2, final]
            )
            _fake_grid_run(tmp_path, label, seed, [e + 0.1 * seed for e in curve])
    # a tuning that picks the grid's end for FG-A only
    for label, best in {"bp": 0.1, "fg_a": 0.3, "lg_fg_a": 0.1}.items():
        for lr in study.tuning.lrs:
            folder = run_dir(tmp_path, "cifar10", label, 1000, lr)
            folder.mkdir(parents=True)
            val = 0.6 if lr == best else 0.5
            records = [{"kind": "epoch", "val_acc": val}, {"kind": "summary", "status": "ok"}]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = build_report(tmp_path, study).read_text()
    assert text.index("## Endpoint") < text.index("## Sanity check") < text.index("## Every")
    assert "Grid runs finished: 9 of 9" in text
    assert "| (a) LG-FG-A − FG-A | 3 | -21.50" in text and "upper end < 0 | supported |" in text
    assert "| (b) LG-FG-A − BP | 3 | +0.50" in text and "upper end < +1 | supported |" in text
    assert "BP's mean final test error: 38.10% over 3 seeds (criterion: below 45%): passed" in text
    assert "| FG-A | 3 | 60.10 [" in text and "| 59.72 | 0.3 | 2.00 [2.00, 2.00] |" in text
    assert "learning rate at the grid's end" in text.split("| FG-A |")[1].splitlines()[0]
    assert "grid's end" not in text.split("| BP |")[1].splitlines()[0]
    assert "s0: epoch 2 of 3 (37.00% vs 38.00% at the end)" in text
    assert (tmp_path / "test_error_cifar10.png").stat().st_size > 0
    assert study.preregistration in text
    # (b)'s three outcomes
    from experiments.suites.stats import paired

    def diff(values):
        return paired(dict(enumerate(values)), dict.fromkeys(range(len(values)), 0.0))

    assert verdict_noninferior(diff([-3.0, -2.5, -2.8]), 3) == "supported"
    assert verdict_noninferior(diff([2.0, 2.3, 2.1]), 3) == "contradicted"
    assert verdict_noninferior(diff([0.5, 1.6, 0.9]), 3) == "inconclusive"
    assert verdict_noninferior(diff([0.5, 0.6]), 3) == "incomplete (2 of 3 seeds)"


def test_the_sanity_check_is_provisional_while_bp_lacks_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.studies.forward_cifar10_report import build_report

    _fake_grid_run(tmp_path, "bp", 0, [55.0, 50.6])
    text = build_report(tmp_path, load_study()).read_text()
    assert (
        "BP's mean final test error: 50.60% over 1 seed (criterion: below 45%): FAILED: the "
        "protocol is too short to compare with the paper (provisional: 1 of 3 seeds)." in text
    )
    assert "| (a) LG-FG-A − FG-A | 0 |" in text and "incomplete (0 of 3 seeds)" in text


def test_the_cpu_study_is_the_gpu_study_at_a_smaller_budget(tmp_path):
    from experiments.studies import forward_cifar10_cpu
    from experiments.studies.forward_cifar10_report import build_report

    gpu, cpu = load_study(), forward_cifar10_cpu.load_study()
    assert cpu.variants == gpu.variants and cpu.tuning == gpu.tuning and cpu.phases == gpu.phases
    assert set(cpu.base) - set(gpu.base) == {"data.train_subset=10000", "train.epochs=5"}
    assert set(gpu.base) - set(cpu.base) == {"train.epochs=25"}
    for label, variant in cpu.variants.items():
        cfg = load_config(None, [*cpu.base, *variant, "data.name=cifar10"])
        assert cfg.data.train_subset == 10_000 and cfg.train.epochs == 5, label
    assert "Primary endpoint (pre-registered" in cpu.preregistration
    text = build_report(tmp_path, cpu).read_text()
    assert "(200 epochs; this study trains 5 epochs of a 10,000-image training subset)" in text
    assert "this study trains 25 epochs)" in build_report(tmp_path / "gpu", gpu).read_text()


def test_gpu_study_names_an_unknown_study():
    script = ROOT / "experiments" / "gpu_study.sh"
    done = subprocess.run(
        ["bash", str(script), "no_such_study"], check=False, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "no study 'no_such_study' (no experiments/studies/no_such_study.toml)" in done.stderr
    bare = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True)
    assert bare.returncode == 2 and "usage:" in bare.stderr and "no study" not in bare.stderr
