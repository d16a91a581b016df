"""An installed wheel works on its own: configurations and the data sample ship inside it.

Builds the wheel of this checkout, installs it (without dependencies) into a
fresh virtual environment whose dependencies come from the test interpreter's
site-packages (added as a plain path, so the editable install of this checkout
is *not* visible there), and runs ``gcgd-train`` from a folder outside the
repository with no data folder anywhere: it must find its configuration in the
package and train on the bundled Fashion-MNIST sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("gcgd_jax-*.whl")
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Dependencies from the test interpreter, as a plain path: its .pth files (the
    # editable install of this checkout among them) are not processed.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir, tmp


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GCGD_", "TFDS_"))}
    env.update(TFDS_DATA_DIR=str(tmp / "tfds"), GCGD_CACHE_DIR=str(tmp / "cache"))
    env.pop("PYTHONPATH", None)
    return env


def test_wheel_lists_its_configs_from_anywhere(installed):
    env_dir, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir(exist_ok=True)
    out = subprocess.run(
        [str(env_dir / "bin" / "gcgd-train"), "--list-configs"],
        cwd=work,
        capture_output=True,
        text=True,
        env=_env(tmp),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines()}
    assert {"quickstart", "cifar10_resnet20", "cpu_fmnist"} <= names
    assert str(REPO) not in out.stdout  # found inside the installed package
    where = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import gcgd_jax; print(gcgd_jax.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        env=_env(tmp),
        check=True,
    ).stdout
    assert str(env_dir) in where


def test_wheel_trains_the_quickstart_on_the_bundled_sample(installed):
    env_dir, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir(exist_ok=True)
    run = subprocess.run(
        [
            str(env_dir / "bin" / "gcgd-train"),
            "--config",
            "quickstart",
            "--out",
            "run",
            "--no-progress",
            "--set",
            "data.train_subset=256",
            "--set",
            "data.test_subset=128",
            "--set",
            "data.batch_size=64",
            "--set",
            "corrections.gc_w.warmup=1",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env=_env(tmp),
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "using the sample bundled with the package" in run.stderr
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["status"] == "completed"
    assert 0.0 <= summary["final_test_acc"] <= 1.0
