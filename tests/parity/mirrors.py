"""The reference repositories' code, read from local git mirrors at pinned commits.

Shared by the fixture writers ``tests/parity/make_fixtures.py`` and
``tests/continual/parity/make_fixtures.py`` (run as scripts, with PyTorch's Python or
the project's: this module needs only the standard library). Their ``--mirrors`` option
(:func:`add_mirrors_argument`) names a folder holding a git clone (bare or not) of each
reference repository, found as ``<owner>+<name>/repo``, ``<owner>+<name>`` or ``<name>``
inside it. A reference file is read with ``git show <commit>:<path>`` at the commit its
writer pins and executed at run time (whole, or only the functions named), as a fresh
module whose ``__file__`` is ``<owner>/<name>@<commit>:<path>``; none of it is copied
into this project.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import types
from pathlib import Path


def add_mirrors_argument(parser: argparse.ArgumentParser) -> None:
    """The writers' required ``--mirrors`` option (see module)."""
    parser.add_argument(
        "--mirrors",
        type=Path,
        required=True,
        help="folder of git clones of the reference repositories: <owner>+<name>/repo, "
        "<owner>+<name> or <name>",
    )


def find_repo(mirrors: Path, repo: str) -> Path:
    """The clone of ``repo`` (``owner/name``) under ``mirrors``; exits if there is none."""
    owner, name = repo.split("/")
    for candidate in (
        mirrors / f"{owner}+{name}" / "repo",
        mirrors / f"{owner}+{name}",
        mirrors / name,
    ):
        if candidate.is_dir():
            return candidate
    raise SystemExit(f"no clone of {repo} under {mirrors}")


def read_source(mirrors: Path, repo: str, commit: str, path: str) -> str:
    """The text of ``path`` in ``repo`` at the pinned ``commit``; exits naming the clone
    when it lacks the commit or the file."""
    clone = find_repo(mirrors, repo)
    command = ["git", "-C", str(clone), "show", f"{commit}:{path}"]
    shown = subprocess.run(command, check=False, capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(
            f"{clone}: no {path} at the pinned commit {commit}: {shown.stderr.strip()}"
        )
    return shown.stdout


def load_module(
    mirrors: Path,
    reference: tuple[str, str],
    path: str,
    module_name: str,
    *,
    register: bool = False,
    functions: tuple[str, ...] | None = None,
    namespace: dict | None = None,
) -> types.ModuleType:
    """The file ``path`` of ``reference`` (``(owner/name, commit)``) executed as a fresh
    module named ``module_name``.

    Args:
      register: also put the module in ``sys.modules`` (before executing it), for the
        reference's own imports of it.
      functions: execute only these top-level functions of the file (its imports and
        the rest left out); exits if one is missing.
      namespace: names the module starts with (what the functions use from the imports
        that were left out).
    """
    repo, commit = reference
    source = read_source(mirrors, repo, commit, path)
    filename = f"{repo}@{commit}:{path}"
    code: str | ast.Module = source
    if functions is not None:
        tree = ast.parse(source)
        body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions]
        missing = set(functions) - {n.name for n in body}
        if missing:
            raise SystemExit(f"{filename} has no {sorted(missing)}")
        code = ast.Module(body=body, type_ignores=[])
    module = types.ModuleType(module_name)
    module.__file__ = filename
    module.__dict__.update(namespace or {})
    if register:
        sys.modules[module_name] = module
    exec(compile(code, filename, "exec"), module.__dict__)
    return module
