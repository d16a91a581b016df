"""The documentation site keeps up with the code and the committed results.

The first checks read the sources under ``docs/`` (no Sphinx needed): every public
name has an API entry, every committed report and plot is on the site. The last one
builds the site as CI does (``-W --keep-going``: any warning fails) and checks that no
built page loads anything from the network; it needs the ``docs`` extra and is skipped
without it, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gcgd_jax
from tests.conftest import in_ci

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "experiments" / "results"

# The sub-packages whose ``__all__`` the API reference documents, name by name.
DOCUMENTED_MODULES = (
    "gcgd_jax.transforms",
    "gcgd_jax.losses",
    "gcgd_jax.gradients",
    "gcgd_jax.layers",
    "gcgd_jax.models",
    "gcgd_jax.models.gc_ode",
    "gcgd_jax.data",
    "gcgd_jax.train",
    "gcgd_jax.continual",
    "gcgd_jax.estimators",
    "gcgd_jax.methods",
    "gcgd_jax.ops",
)


def _autosummary_entries() -> set[str]:
    """Fully qualified names listed in the ``autosummary`` directives under docs/api."""
    names: set[str] = set()
    for rst in sorted((DOCS / "api").glob("*.rst")):
        module = None
        lines = rst.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if m := re.match(r"\.\. (?:current)?module:: (\S+)", line):
                module = m.group(1)
            if line.startswith(".. autosummary::"):
                i += 1
                while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                    entry = lines[i].strip()
                    if entry and not entry.startswith(":"):
                        names.add(entry if module is None else f"{module}.{entry}")
                    i += 1
                continue
            i += 1
    return names


def _documented_modules() -> set[str]:
    return {
        m.group(1)
        for rst in (DOCS / "api").glob("*.rst")
        for m in re.finditer(r"^\.\. automodule:: (\S+)", rst.read_text(), flags=re.MULTILINE)
    }


def test_every_public_name_has_an_api_entry():
    entries = _autosummary_entries()
    missing = []
    for module_name in DOCUMENTED_MODULES:
        module = importlib.import_module(module_name)
        parent = module_name.rsplit(".", 1)[0]
        parent_all = getattr(importlib.import_module(parent), "__all__", ())
        for name in module.__all__:
            here, above = f"{module_name}.{name}", f"{parent}.{name}"
            if here not in entries and not (name in parent_all and above in entries):
                missing.append(here)
    assert not missing, f"public names without an API page (add them to docs/api/*.rst): {missing}"


def test_every_name_of_the_package_is_on_the_api_index():
    entries = _autosummary_entries()
    modules = _documented_modules()
    index = (DOCS / "api" / "index.rst").read_text()
    for name in gcgd_jax.__all__:
        assert f"``gcgd_jax.{name}``" in index, f"gcgd_jax.{name} is not on docs/api/index.rst"
        if name in gcgd_jax._SUBMODULES:
            assert f"gcgd_jax.{name}" in modules, f"no API page for the sub-package {name}"
        else:
            assert f"{gcgd_jax._EXPORTS[name]}.{name}" in entries, f"no API page for {name}"


def test_every_committed_report_and_plot_is_on_the_site():
    reports = [
        p for p in RESULTS.rglob("*.md") if "runs" not in p.parts and p.name != "DISCUSSION.md"
    ]
    assert reports
    for report in reports:
        rel = report.relative_to(RESULTS)
        page = DOCS / "results" / rel
        assert page.is_file(), f"{rel}: no page docs/results/{rel} (include the report there)"
        assert f"experiments/results/{rel.as_posix()}" in page.read_text()
    # a suite's DISCUSSION.md is on the site once: copied into its RESULTS.md (the short
    # suites), or a page of its own that its RESULTS.md links to and does not copy
    for discussion in RESULTS.glob("*/DISCUSSION.md"):
        results = (discussion.parent / "RESULTS.md").read_text()
        copied = discussion.read_text().strip()[:200] in results
        page = DOCS / "results" / discussion.relative_to(RESULTS)
        if page.is_file():
            assert not copied, f"{discussion} is on the site twice: its page and RESULTS.md"
            assert "(DISCUSSION.md)" in results, f"{discussion.parent}/RESULTS.md: no link to it"
        else:
            assert copied, discussion
    # every plot is shown: by an included report, or by a page of its own
    shown = "\n".join(p.read_text() for p in [*DOCS.rglob("*.md"), *reports])
    plots = [p for p in RESULTS.rglob("*.png") if "runs" not in p.parts]
    assert plots
    for plot in plots:
        rel = plot.relative_to(RESULTS).as_posix()
        in_report = any(f"({plot.name})" in r.read_text() for r in plot.parent.glob("*.md"))
        assert in_report or f"experiments/results/{rel}" in shown, f"{rel} is not on the site"


def test_the_readme_names_the_docs_command():
    readme = (ROOT / "README.md").read_text()
    assert "python -m sphinx -W --keep-going -b html docs docs/_build/html" in readme
    extras = _extras()
    # CI installs the README's extras (data, dev): dev carries the docs packages
    assert set(extras["docs"]) <= set(extras["dev"])


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _docs_tools_missing() -> list[str]:
    needed = ("sphinx", "myst_parser", "furo", "sphinx-mathjax-offline")
    return [n for n in needed if importlib.util.find_spec(n) is None]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)


def test_the_readme_training_loop_runs_as_written(tmp_path):
    """The README's optax-chain quickstart (the same block as the getting-started page's) is a
    complete training loop: run as a script, it trains and prints a test accuracy well above
    chance (10 classes)."""
    (readme,) = _python_blocks(ROOT / "README.md")[:1]
    (page,) = _python_blocks(DOCS / "getting_started.md")[:1]
    assert readme == page, "README.md and docs/getting_started.md show different chain examples"
    script = tmp_path / "chain.py"
    script.write_text(readme)
    # As in the in-process tests, a deprecation warning is an error here too.
    warn = ["-W", "error::DeprecationWarning", "-W", "error::FutureWarning"]
    result = subprocess.run(
        [sys.executable, *warn, str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"step 40: loss [0-9.]+, test accuracy ([0-9.]+)%", result.stdout)
    assert found, result.stdout
    assert float(found.group(1)) > 40.0, result.stdout


def test_the_guides_examples_run():
    """The GC-ODE-on-your-model and the forward-gradient examples run as written."""
    import jax.numpy as jnp

    own_model = _python_blocks(DOCS / "guides" / "gc_ode_own_model.md")[0]
    namespace: dict = {}
    exec(compile(own_model, "gc_ode_own_model.md", "exec"), namespace)
    x, y = jnp.ones((4, 16, 16, 3)), jnp.zeros((4,), jnp.int32)
    loss = namespace["train_step"](namespace["model"], namespace["optimizer"], x, y)
    assert jnp.isfinite(loss)
    assert namespace["model"].gc_ode.gates().shape == (2,)

    forward = _python_blocks(DOCS / "guides" / "forward_gradients.md")[0]
    namespace = {}
    exec(compile(forward, "forward_gradients.md", "exec"), namespace)
    assert jnp.isfinite(namespace["loss"])


@pytest.mark.slow
def test_the_site_builds_offline_without_warnings(tmp_path):
    missing = _docs_tools_missing()
    if missing:
        message = f'the docs extra is not installed (pip install -e ".[docs]"): {missing}'
        if in_ci():
            pytest.fail(f"CI=true and the docs cannot be built: {message}")
        pytest.skip(message)
    out = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, check=False, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert build.returncode == 0, (build.stdout + build.stderr)[-6000:]
    pages = list(out.rglob("*.html"))
    assert len(pages) > 50
    # Nothing is loaded from the network: scripts, style sheets, fonts, images, frames.
    remote = re.compile(
        r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE
    )
    offenders = [str(p.relative_to(out)) for p in pages if remote.search(p.read_text())]
    offenders += [
        str(p.relative_to(out))
        for p in out.rglob("*.css")
        if re.search(r"url\(\s*['\"]?(?:https?:)?//|@import\s+url\(\s*['\"]?https?:", p.read_text())
    ]
    assert not offenders, f"pages that load from the network: {offenders[:10]}"
    # MathJax is the local copy, and every page with maths loads it.
    gc_w = (out / "api" / "generated" / "gcgd_jax.transforms.gc_w.html").read_text()
    assert re.search(r'<script[^>]*src="\.\./\.\./_static/mathjax/tex-chtml\.js', gc_w)
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (out / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    # The plots are copied into the site.
    assert len(list((out / "_images").glob("*.png"))) >= 9
