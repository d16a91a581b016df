"""Sphinx configuration of the gcgd_jax documentation site.

Build (from the repository root)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Everything the built site loads ships with the installed packages: the theme's
own CSS and fonts (furo uses the system fonts) and MathJax 3 from
``sphinx-mathjax-offline`` (copied into ``_static/mathjax``), so the site
builds and reads with no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, whatever is installed

import gcgd_jax

project = "gcgd_jax"
author = "the gcgd_jax authors"
copyright = "the gcgd_jax authors, Apache-2.0"
release = version = gcgd_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    # MathJax 3 bundled in the wheel; sets mathjax_path to the local copy.
    "sphinx-mathjax-offline",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# -- API reference -----------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Markdown pages ----------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = f"gcgd_jax {release}"
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}


# -- Docstrings of constants -------------------------------------------------------------------
# A module-level constant (a dict, a tuple, a ``Literal`` alias) has no docstring of its own:
# autodoc would print its type's (``dict(**kwargs)``, typing's ``Literal``). Constants defined
# where they are documented carry a ``#:`` comment; the re-exported ones are described here.
_CONSTANT_DOCS = {
    "gcgd_jax.data.SPECS": "Every data set's :class:`DatasetSpec` (classes, image shape, "
    "normalisation statistics, tensorflow-datasets name, folder aliases), by canonical name.",
    "gcgd_jax.models.GCODEMode": "GC-ODE's modes: ``Literal['branch', 'gradient', "
    "'scale_only', 'frozen_branch']`` (see :class:`GCODEConfig`).",
}


def _constant_docstring(app, what, name, obj, options, lines):
    if what not in ("data", "attribute"):
        return
    if name in _CONSTANT_DOCS:
        lines[:] = [_CONSTANT_DOCS[name]]
        return
    own = getattr(type(obj), "__doc__", None)
    if isinstance(own, str) and lines and "\n".join(lines).strip() == own.strip():
        lines[:] = []
    elif any(line.startswith("Alias for field number") for line in lines[:1]):
        lines[:] = []  # NamedTuple fields: the class docstring describes them


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
