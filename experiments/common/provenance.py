"""Where a result came from: the checkout's git commit and the machine, for every results file."""

from __future__ import annotations

import os
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


def checkout_state(root: Path | str = REPO) -> dict[str, object]:
    """:func:`tree_state` with ``"commit_source"``: ``"git"``; or, in a copy of a checkout
    without git (the lent GPU machine's has no ``.git``), ``"GCGD_COMMIT"``: the commit that
    variable names, the copy counted clean (whoever sets it vouches that the copy is that
    commit's tree); neither: no commit, not clean, ``None``, and the reason in ``changed``.
    Only ``root``'s own ``.git`` counts (not a repository that a copy happens to lie in)."""
    if (Path(root) / ".git").exists():
        state = tree_state(root)
        if state["commit"] is not None:
            return {**state, "commit_source": "git"}
    commit = os.environ.get("GCGD_COMMIT")
    if commit:
        return {"commit": commit, "clean": True, "changed": [], "commit_source": "GCGD_COMMIT"}
    reason = "(not a git checkout, and GCGD_COMMIT is not set)"
    return {"commit": None, "clean": False, "changed": [reason], "commit_source": None}


def machine(*, with_jax: bool = True) -> dict[str, object]:
    """The machine a result was measured on, the same keys for every results file:
    ``cpu`` (processor model), ``cores`` (usable by this process), ``platform``,
    ``python``, ``load_avg`` (1/5/15-minute load when measured, ``None`` where the
    system has none); with ``with_jax`` (this imports JAX and starts its backend) also
    ``jax``, ``jaxlib``, ``backend``, ``device`` (the first device's platform and kind)
    and ``devices`` (their count)."""
    import os
    import platform

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, object] = {
        "cpu": model,
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg": load,
    }
    if with_jax:
        import jax
        import jaxlib

        device = jax.devices()[0]
        info |= {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(),
            "device": f"{device.platform}: {device.device_kind}",
            "devices": jax.device_count(),
        }
    return info


def describe_machine(info: dict[str, object] | None = None) -> str:
    """One line for a report: ``machine()``'s processor, cores, platform, Python and, when
    recorded, JAX and its devices (``info`` defaults to ``machine(with_jax=False)``). Older
    results files' machines read too (``cores_available`` or ``cpu_count`` for ``cores``,
    ``num_devices`` for ``devices``, no ``cpu`` or ``python``), so that a committed record's
    table can be rebuilt."""
    m = machine(with_jax=False) if info is None else info
    cpu = m.get("cpu") or m.get("processor") or "unknown processor"
    cores = m.get("cores", m.get("cores_available", m.get("cpu_count", "?")))
    text = f"{cpu} ({cores} cores), {m.get('platform', '?')}, Python {m.get('python', '?')}"
    if "jax" in m:
        text += f", jax {m['jax']}"
    if "device" in m:
        text += f" on {m.get('devices', m.get('num_devices', '?'))} x {m['device']}"
    return text
