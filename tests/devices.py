"""Running a test on two devices when the session has one (the user set ``XLA_FLAGS``)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax


def rerun_with_two_devices(test_file: str, test_name: str) -> bool:
    """With fewer than 2 devices, run ``test_file::test_name`` again in a process with two
    fake CPU devices, assert it passed and return True (the caller returns); False with 2
    devices or more (the caller goes on)."""
    if jax.device_count() >= 2:
        return False
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::{test_name}"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    return True
