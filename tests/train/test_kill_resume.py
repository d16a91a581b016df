"""A real ``gcgd-train`` process killed with SIGKILL (no clean-up at all) resumes bit-exact.

The in-process resume tests (``test_trainer.py``) stop runs politely; here the
operating system kills the process at seeded random moments -- once while a
checkpoint is being written (a ``*.orbax-checkpoint-tmp-*`` folder exists) --
and ``--resume`` is run until the run completes. Every epoch record then equals
the uninterrupted run's (timings aside). The run carries GC-W's optimizer state
and GC-ODE's gates and auxiliary sums, so every kind of state is in the checkpoints.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gcgd_jax.train.report import read_metrics
from tests.train.test_cli import TINY

pytestmark = pytest.mark.slow

ARGS = [
    *TINY,  # the CLI tests' tiny synthetic run
    "--set", "train.epochs=6",  # 24 steps
    "--set", "checkpoint.every_steps=1",  # a checkpoint write after every step
    "--set", "checkpoint.keep=2",
    "--set", "corrections.chain=['gc_w']",
    "--set", "corrections.gc_w.warmup=2",
    "--set", "model.gc_ode.mode=gradient",
    "--no-progress",
]  # fmt: skip
TIMING = {"epoch_time", "train_time", "eval_time", "step_time_median", "images_per_s"}
TIMEOUT_S = 600


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gcgd_jax.train", *ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err


def _writing(out: Path) -> bool:
    folder = out / "checkpoints"
    return folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())


def _newest(out: Path) -> int:
    folder = out / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


def _kill_when(proc: subprocess.Popen, ready, delay_s: float = 0.0, poll_s: float = 0.02) -> bool:
    """SIGKILLs ``proc`` ``delay_s`` after ``ready()`` first holds (checked every ``poll_s``);
    False if it exited first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.communicate()
            return False
        time.sleep(poll_s)
    time.sleep(delay_s)
    if proc.poll() is not None:
        proc.communicate()
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return True


def _epochs(out: Path) -> list[dict]:
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["kind"] == "summary" and records[-1]["status"] == "completed"
    epochs = [r for r in records if r["kind"] == "epoch"]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in epochs]


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    plain = tmp_path / "plain"
    _finish(_start(plain))
    expected = _epochs(plain)
    assert len(expected) == 6 and expected[0]["gc_ode_gate"] is not None

    out, rng = tmp_path / "killed", random.Random(0)
    # 1: while a checkpoint is being written (a write lasts tens of milliseconds: polled
    # every 2 ms); 2: at a seeded random moment after this process's first own checkpoint
    # (between steps, inside a step, an evaluation or another write).
    caught_write = _kill_when(_start(out), lambda: _writing(out), poll_s=0.002)
    assert caught_write, "the run finished before any checkpoint write could be interrupted"
    start = _newest(out)
    progressed = lambda: _newest(out) > start
    assert _kill_when(_start(out, "--resume"), progressed, rng.uniform(0.0, 0.5))
    _finish(_start(out, "--resume"))
    assert _epochs(out) == expected, "after two SIGKILLs the epoch records differ"
