"""Test-session settings, set before JAX starts.

* XLA flags: the CPU convolution flag goes through the library's own guard
  (:func:`gcgd_jax.ops.apply_cpu_flags`: only when the user has not
  set ``XLA_FLAGS``, on the CPU, with a jaxlib it was measured on), then two
  fake CPU devices are added for the data-parallel tests.
* Compiled programs: JAX's persistent compilation cache in one folder of the
  system's temporary directory (``$JAX_COMPILATION_CACHE_DIR`` if set), shared
  by the xdist workers and the subprocesses the tests start. Many tests build
  the same tiny ResNet-20 step (the same program, other seeds or folders); on
  the CPU most of such a test is XLA's compile, which a cache hit skips. The
  key covers the program, the compile options and flags and the jax/jaxlib
  versions: a hit is the executable a fresh compile would build.
* Home folder: every test gets temporary cache, tensorflow-datasets and
  matplotlib folders through the environment (inherited by the subprocesses
  the tests start), so no test reads or writes ``~/.cache``,
  ``~/tensorflow_datasets`` or ``~/.config``.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gcgd_jax_tests_xla_cache")
)

from gcgd_jax.ops import apply_cpu_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")  # None: not set by the user
CPU_FLAG_APPLIED = apply_cpu_flags()
_DEVICES_FLAG = "--xla_force_host_platform_device_count=2"
_existing = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _existing:
    os.environ["XLA_FLAGS"] = f"{_existing} {_DEVICES_FLAG}".strip()

import pytest


@pytest.fixture(autouse=True)
def _no_home_folders(tmp_path_factory, monkeypatch):
    """Caches and per-user data folders in the session's temporary folder."""
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("GCGD_CACHE_DIR", str(home / "gcgd_cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(home / "tensorflow_datasets"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "matplotlib"))
    monkeypatch.delenv("GCGD_DATA_DIR", raising=False)


# --------------------------------------------------------------------------- real data

REPO_ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """``CI=true`` (or 1/yes) in the environment, as CI services and ``.ci/run`` set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_shared_data() -> Path | None:
    """The shared data folder (``$GCGD_SHARED_DATA``, else ``../shared/data`` beside the
    repository or the working directory), or None."""
    candidates = [os.environ.get("GCGD_SHARED_DATA")]
    candidates += [REPO_ROOT / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "README.md").is_file():
            return Path(c).resolve()
    return None


def require_shared_data() -> Path:
    """The shared data folder, or skip the calling test; with ``CI=true`` fail it instead,
    so CI cannot pass without reading the real data."""
    path = find_shared_data()
    if path is None:
        message = (
            "shared data folder not found: looked at $GCGD_SHARED_DATA and ../shared/data "
            "beside the repository and the working directory (set GCGD_SHARED_DATA)"
        )
        if in_ci():
            pytest.fail(f"CI=true and the real-data tests cannot run: {message}")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder (see :func:`require_shared_data`)."""
    return require_shared_data()
