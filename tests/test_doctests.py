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
    for name in ("gcgd_jax.transforms.agr", "gcgd_jax.models.resnet", "gcgd_jax.models.gc_ode"):
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
