import re
import shutil
import subprocess

import pytest

from experiments.common.provenance import git_commit


def test_outside_a_checkout_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_the_head_and_says_when_tracked_files_differ(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert git_commit(tmp_path) == head + "+dirty"


def test_every_results_file_describes_its_machine_the_same_way():
    from experiments.common.provenance import describe_machine, machine

    plain = machine(with_jax=False)
    assert {"cpu", "cores", "platform", "python", "load_avg"} == set(plain)
    assert plain["cores"] >= 1
    full = machine()
    assert {"jax", "jaxlib", "backend", "device", "devices"} <= set(full)
    line = describe_machine(full)
    assert line.startswith(f"{full['cpu']} ({full['cores']} cores), {full['platform']}")
    assert f"jax {full['jax']} on {full['devices']} x {full['device']}" in line
    assert "jax" not in describe_machine(plain)


def test_no_script_finds_its_results_folder_from_its_own_path():
    """Results folders come from ``experiments.RESULTS`` (a script's own folder moved once
    already, and three benches kept writing into ``experiments/bench/results/``)."""
    from experiments import ROOT

    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if re.search(r"__file__\)\.resolve\(\)\.parents?(\[\d\])? / \"results\"", p.read_text())
    ]
    assert not offenders, offenders
