"""One writer per run folder (``gcgd_jax.train.lock``): real processes and the lock itself.

Two ``gcgd-train`` processes on the same ``--out``: the second stops with one line naming
the folder and the holder (exit 2) and touches nothing, not even with ``--overwrite``; the
first, SIGKILLed, leaves a lock the operating system has released, so ``--resume`` runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcgd_jax.train.lock import LOCK_NAME, RunFolderBusy, RunLock
from gcgd_jax.train.report import read_metrics
from tests.train.test_cli import TINY

TIMEOUT_S = 600


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    code = (
        "import sys, time; from gcgd_jax.train.lock import RunLock; "
        "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        with pytest.raises(RunFolderBusy) as err:
            RunLock(folder)
        message = str(err.value)
        assert f"output folder {folder} is in use by another run (pid {proc.pid} on " in message
        assert "choose another --out" in message
    finally:
        proc.kill()
        proc.wait()
    lock = RunLock(folder)  # killed: the operating system released its lock
    assert lock.held
    lock.release()
    assert (folder / LOCK_NAME).read_bytes() == b""  # emptied, the folder kept


def test_the_lock_is_reentrant_in_one_process_and_cleans_a_folder_it_made(tmp_path):
    folder = tmp_path / "new" / "run"
    first = RunLock(folder)
    text = (folder / LOCK_NAME).read_text()
    assert f"pid {os.getpid()} on " in text
    second = RunLock(folder)  # a later run of the same process takes it over
    assert second.held and not first.held
    first.release()  # no longer the owner: a no-op
    assert second.held
    second.release()
    assert not second.held
    assert not folder.exists()  # made by the first lock, nothing else written: removed
    (tmp_path / "kept").mkdir()
    RunLock(tmp_path / "kept").release()
    assert (tmp_path / "kept").is_dir()  # existed before: kept


@pytest.mark.slow
def test_two_gcgd_train_processes_on_one_folder(tmp_path):
    out = tmp_path / "run"
    # checkpoint.keep: the first deletes none of its own checkpoints while the others try
    args = [*TINY, "--set", "train.epochs=500", "--set", "checkpoint.keep=1000", "--no-progress"]
    args += ["--out", str(out)]
    cmd = [sys.executable, "-m", "gcgd_jax.train"]
    first = subprocess.Popen([*cmd, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        # the first has saved its first epoch (a complete step folder: its name is the step;
        # the folder itself exists from the start, and a write in progress has a suffix)
        while not any(p.name.isdigit() for p in (out / "checkpoints").glob("*")):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)

        def kept() -> set[Path]:  # the first's files, without checkpoint writes in progress
            return {
                p.relative_to(out) for p in out.rglob("*") if "orbax-checkpoint-tmp" not in str(p)
            }

        before = kept()
        for extra in ([], ["--overwrite"], ["--resume"]):
            second = subprocess.run(
                [*cmd, *args, *extra],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
            assert second.returncode == 2, second.stderr[-3000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert lines[0].startswith(f"gcgd-train: error: output folder {out} is in use by "
                                       f"another run (pid {first.pid} on "), lines  # fmt: skip
            assert first.poll() is None  # the first goes on
            assert before <= kept()  # nothing of the first's was removed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # SIGKILLed: no clean-up ran, yet its own --resume takes the folder and continues.
    resume = subprocess.Popen(
        [*cmd, "--out", str(out), "--resume", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(r["kind"] == "resume" for r in read_metrics(out / "metrics.jsonl")):
            assert resume.poll() is None, resume.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        resume.kill()
        resume.wait(timeout=60)
