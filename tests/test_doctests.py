"""Every docstring example in the package runs as written (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import gcgd_jax


def _examples(module) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(gcgd_jax.__path__, prefix="gcgd_jax.")
    if not m.name.endswith("__main__")
)
WITH_EXAMPLES = [n for n in MODULES if _examples(importlib.import_module(n))]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
    tests = _examples(importlib.import_module(name))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_package_has_examples():
    # the public entry points carry examples: transforms, models, data, training config
    for name in (
        "gcgd_jax.transforms.agr",
        "gcgd_jax.models.resnet",
        "gcgd_jax.models.gc_ode.module",
    ):
        assert name in WITH_EXAMPLES


def test_no_reference_to_files_outside_the_repository():
    """Docstrings and docs cite only what a user has: the project's design notes live
    outside the repository, so no shipped file may point at them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    banned = ("shared/design", "shared/seeds", "METHODS.md", "CONVENTIONS.md", "CPU_PERFORMANCE.md")
    files = [
        *root.joinpath("gcgd_jax").rglob("*.py"),
        root / "README.md",
        *root.joinpath("docs").rglob("*.md"),
        *root.joinpath("docs").rglob("*.rst"),
        root / "docs" / "conf.py",
        *root.joinpath("experiments").rglob("*.py"),
        *root.joinpath("experiments").glob("*/README.md"),
    ]
    offenders = [
        f"{f.relative_to(root)}: {word}" for f in files for word in banned if word in f.read_text()
    ]
    assert not offenders, offenders


def test_library_code_cites_no_experiment_paths_or_dates():
    """The installed package explains itself without the repository's experiments: a
    module names no ``experiments/`` path and no measurement date (figures, machines and
    dates live in the docs and the results pages, which say when they were measured)."""
    import re
    from pathlib import Path

    package = Path(gcgd_jax.__file__).parent
    pattern = re.compile(r"experiments/|\b20\d\d-\d\d-\d\d\b")
    offenders = [
        f"{f.relative_to(package)}:{i}: {line.strip()}"
        for f in package.rglob("*.py")
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
