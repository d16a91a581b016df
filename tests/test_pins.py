"""The version pins say what is tested.

* Every floor in ``pyproject.toml`` (runtime dependencies, the data and tensorboard extras)
  is pinned exactly in ``.ci/oldest.txt``, which CI's first leg installs, and nothing else
  is pinned there: the floors are the oldest versions CI installs.
* No runtime dependency carries an upper bound (CI's second leg tests the newest releases;
  a bound belongs only where a known break is, and then this test names it).
* Installing this project into an environment that already has JAX (CI's second leg: jax
  0.12.x on Python 3.13) keeps that JAX: pip's own resolver, asked offline, plans to
  change neither jax nor jaxlib.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PINNED_EXTRAS = ("data", "tensorboard")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floors() -> dict[str, str]:
    project = _project()
    reqs = [*project["dependencies"]]
    for extra in PINNED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    floors = {}
    for text in reqs:
        req = Requirement(text)
        (floor,) = [s.version for s in req.specifier if s.operator == ">="] or [None]
        assert floor is not None, f"{text}: every dependency states its floor (>=)"
        floors[req.name.lower()] = floor
    return floors


def _oldest() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
            pins[name.lower()] = version
    return pins


def test_the_floors_are_what_ci_installs_first():
    assert _floors() == _oldest()


def test_no_upper_bound_on_what_users_install():
    for text in _project()["dependencies"]:
        bounds = [s for s in Requirement(text).specifier if s.operator in ("<", "<=", "==", "~=")]
        assert not bounds, f"{text}: an upper bound needs a known break named beside it"


def test_installing_keeps_the_jax_already_there(tmp_path):
    """pip, offline and without build isolation (everything needed is installed), plans
    the install of this checkout into the running environment: it must keep jax and jaxlib
    as they are. A cap below the installed JAX makes pip plan a downgrade (or, offline,
    fail to find one): either fails here."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
         "--no-build-isolation", "--quiet", "--report", str(report), "-e", f"{ROOT}[data]"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in
               json.loads(report.read_text())["install"]}  # fmt: skip
    assert "jax" not in planned and "jaxlib" not in planned, planned
    assert set(planned) == {"gcgd-jax"}, planned  # every dependency already satisfied
