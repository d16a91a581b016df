"""Where a result came from: the checkout's git commit, for every results file."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _git(root: Path | str, *args: str) -> str:
    """``git -C root args``'s standard output; ``CalledProcessError`` on a non-zero exit."""
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout


def git_commit(root: Path | str = REPO) -> str | None:
    """The full commit hash of the checkout at ``root``, with ``+dirty`` when
    tracked files differ from it; ``None`` outside a git checkout (or without git)."""
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], check=False
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def tree_state(root: Path | str = REPO) -> dict[str, object]:
    """``{"commit", "clean", "changed"}`` of the checkout at ``root``: its commit (``None``
    outside git), whether its tracked files equal that commit and no untracked file lies
    outside ``experiments/results/`` (results being written do not make a tree dirty), and
    the paths that make it dirty."""
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        status = _git(root, "status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "clean": False, "changed": ["(not a git checkout)"]}
    changed = []
    for line in status.splitlines():
        code, path = line[:2], line[3:]
        if code == "??" and path.startswith("experiments/results/"):
            continue
        changed.append(path)
    return {"commit": head, "clean": not changed, "changed": changed}


def machine() -> dict[str, object]:
    """The machine a result was measured on: processor model, cores, Python, JAX and its
    devices (imports JAX)."""
    import os
    import platform

    import jax

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": f"{device.platform}: {device.device_kind}",
        "devices": jax.device_count(),
    }
