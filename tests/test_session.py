"""The test session's own settings (tests/conftest.py): XLA flags and no home folders."""

import os
import subprocess
import sys
from pathlib import Path

from gcgd_jax.ops import CPU_CONV_FLAG
from tests import conftest


def test_xla_flags_come_from_the_library_guard():
    flags = os.environ["XLA_FLAGS"].split()
    if conftest.USER_XLA_FLAGS is None:  # the library decided, not the conftest
        assert (CPU_CONV_FLAG in flags) == conftest.CPU_FLAG_APPLIED
        assert "--xla_force_host_platform_device_count=2" in flags
    else:  # a user's own flags are kept as they are, without the library's flag added
        assert not conftest.CPU_FLAG_APPLIED
        assert os.environ["XLA_FLAGS"].startswith(conftest.USER_XLA_FLAGS.strip())


def test_caches_and_data_folders_are_not_in_the_home_folder():
    from gcgd_jax.data.cache import default_cache_dir
    from gcgd_jax.data.tfds_source import default_tfds_dir

    home = Path.home().resolve()
    for folder in (default_cache_dir(), default_tfds_dir(), Path(os.environ["MPLCONFIGDIR"])):
        assert not folder.resolve().is_relative_to(home), folder
    assert "GCGD_DATA_DIR" not in os.environ
    # Subprocesses (the comparison runner's training runs) inherit the same folders.
    out = subprocess.run(
        [sys.executable, "-c", "from gcgd_jax.data.cache import default_cache_dir as d; print(d())"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    assert Path(out) == default_cache_dir()


def test_ci_script_builds_a_clean_venv_and_runs_the_readme_test_command():
    """``.ci/run`` runs the README's install and test commands twice, each leg in a fresh
    virtual environment: the machine's python3 with the floors (.ci/oldest.txt as pip's
    constraints), then Python 3.13 with the newest releases."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    (block,) = re.findall(r"Run the tests:\s*```sh\n(.*?)\n```", readme, flags=re.DOTALL)
    commands = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert 'export CI="${CI:-true}"' in commands
    # The one function both legs run; $1 the interpreter, $2 the venv folder.
    assert '"$1" -m venv --clear "$2"' in commands
    assert '"$2/bin/python" -m pip install --quiet -e ".[data,dev]"' in commands
    assert '"$2/bin/python" -m pytest -q -n 2' in commands
    legs = [c for c in commands if "install_and_test " in c]
    assert legs == [
        'PIP_CONSTRAINT="$PWD/.ci/oldest.txt" install_and_test python3 .venv',
        'install_and_test "$PY313" .venv313',
    ]
    # With $2 = .venv, the test line is the README's test command, word for word.
    assert (
        '"$2/bin/python" -m pytest -q -n 2'.replace('"$2', ".venv").replace('"', "")
        == block.strip()
        == ".venv/bin/python -m pytest -q -n 2"
    )
