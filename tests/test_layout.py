"""The package's rooms hold what their names say, experiments use only public names, and
``import gcgd_jax`` (and the CLI's ``--help``) stay light."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import optax

from gcgd_jax import methods

ROOT = Path(__file__).resolve().parents[1]
# The public API of namedtuples starts with an underscore.
_NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in _NAMEDTUPLE_API


def _private_uses(source: str, *, private_modules_allowed: bool = False) -> list[str]:
    """Private names of gcgd_jax used by ``source``: imports of private modules or names,
    and ``obj._x`` on anything but ``self``/``cls``. With ``private_modules_allowed`` (the
    rule inside the package) a private helper module may be imported: its names are public
    to the package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gcgd_jax"):
            if not private_modules_allowed and any(_private(p) for p in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if _private(a.name)
                and not (private_modules_allowed and _is_module(f"{node.module}.{a.name}"))
            ]
        elif isinstance(node, ast.Import) and not private_modules_allowed:
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("gcgd_jax") and any(_private(p) for p in a.name.split("."))
            ]
        elif (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_the_scanner_finds_private_uses():
    assert _private_uses("from gcgd_jax.train.trainer import _Sums") != []
    assert _private_uses("from gcgd_jax.transforms import _common") != []
    assert _private_uses("import gcgd_jax.transforms._common") != []
    assert _private_uses("trainer._train_step(1)") != []
    assert _private_uses("self._x = state._replace(a=1)") == []


def test_no_experiment_touches_a_private_name():
    offenders = {
        str(path.relative_to(ROOT)): uses
        for path in sorted((ROOT / "experiments").rglob("*.py"))
        if (uses := _private_uses(path.read_text()))
    }
    assert not offenders, f"experiments use private names: {offenders}"


def test_the_package_scanner_finds_foreign_private_names():
    inside = {"private_modules_allowed": True}
    assert _private_uses("from gcgd_jax.train.trainer import _Sums", **inside) != []
    assert _private_uses("trainer._restore(1)", **inside) != []
    assert _private_uses("from gcgd_jax.transforms import _common", **inside) == []
    assert _private_uses("self._x = state._replace(a=1)", **inside) == []


def test_no_library_module_uses_another_modules_private_names():
    """Inside gcgd_jax a module reaches another only through its public names (private
    helper modules included: what they define is public to the package)."""
    offenders = {
        str(path.relative_to(ROOT)): uses
        for path in sorted((ROOT / "gcgd_jax").rglob("*.py"))
        if (uses := _private_uses(path.read_text(), private_modules_allowed=True))
    }
    assert not offenders, f"modules use other modules' private names: {offenders}"


def test_transforms_holds_only_optax_transforms():
    """Every public module of gcgd_jax.transforms defines a registered transform factory
    (an ordinary correction, or a continual-learning one fed the old tasks' gradients)."""
    import gcgd_jax.transforms as pkg

    entries = (*methods.methods_of_kind("transform"), *methods.methods_of_kind("continual"))
    registered = {m.factory.split(":")[0] for m in entries}
    modules = {
        f"gcgd_jax.transforms.{info.name}"
        for info in pkgutil.iter_modules(pkg.__path__)
        if not info.name.startswith("_")
    }
    assert modules == registered
    for m in entries:
        tx = m.load()(**m.fixed)
        assert isinstance(tx, optax.GradientTransformation), m.name


def test_each_kind_lives_in_its_room():
    rooms = {
        "transform": "gcgd_jax.transforms.",
        "continual": "gcgd_jax.transforms.",
        "loss": "gcgd_jax.losses.",
        "gradient": "gcgd_jax.gradients.",
    }
    for m in methods.METHODS.values():
        if m.kind in rooms:
            assert m.factory.startswith(rooms[m.kind]), m
    layer = importlib.import_module("gcgd_jax.layers")
    assert hasattr(layer, "BackwardGradNorm")


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()


def test_the_training_loop_names_no_model_method():
    """GC-ODE reaches the train step and the trainer only through the
    model's auxiliary seam (gcgd_jax.models.aux): no identifier or import there names it
    (docstrings and comments may, as examples)."""
    found = []
    for name in ("step.py", "trainer.py"):
        tree = ast.parse((ROOT / "gcgd_jax" / "train" / name).read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # a string used as a key, not a docstring: short and identifier-like
                names = [node.value] if node.value.isidentifier() else []
            found += [f"{name}:{node.lineno}: {n}" for n in names if "gc_ode" in n.lower()]
    assert not found, found


def test_importing_the_package_and_the_cli_is_light():
    heavy = ("jax", "flax", "optax", "diffrax")
    loaded = _run(
        "import sys, gcgd_jax, gcgd_jax.methods, gcgd_jax.train.cli, gcgd_jax.train.config, "
        "gcgd_jax.models, gcgd_jax.models.gc_ode.config, gcgd_jax.ops.xla_flags, "
        "gcgd_jax.continual.cli, gcgd_jax.continual.config; "
        "from gcgd_jax.ops import apply_cpu_flags; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    assert loaded == "", f"import gcgd_jax / its CLI / its config loaded {loaded}"


def test_the_old_cpu_speed_alias_is_gone():
    """``gcgd_jax.cpu_speed`` (a deprecated alias of :mod:`gcgd_jax.ops` in a package that was
    never released) is removed; nothing refers to it."""
    assert not (ROOT / "gcgd_jax" / "cpu_speed.py").exists()
    users = [
        str(path.relative_to(ROOT))
        for folder in ("gcgd_jax", "experiments", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "test_layout.py" and "cpu_speed" in path.read_text()
    ]
    assert not users, f"use gcgd_jax.ops instead of gcgd_jax.cpu_speed: {users}"


def test_public_names_resolve_lazily():
    import gcgd_jax

    for name in gcgd_jax.__all__:
        assert getattr(gcgd_jax, name) is not None, name
    assert gcgd_jax.gc_w is importlib.import_module("gcgd_jax.transforms.gc_w").gc_w


ROLES = ("common", "suites", "studies", "bench", "tools")


def test_experiments_are_arranged_by_role():
    """``experiments/`` holds role folders (each a package with a README), the GPU check and
    results; everything runs as ``python -m experiments.<role>.<name>``, without import hacks."""
    exp = ROOT / "experiments"
    assert {p.name for p in exp.glob("*.py")} == {"__init__.py", "gpu_check.py"}
    for role in ROLES:
        assert (exp / role / "__init__.py").is_file() and (exp / role / "README.md").is_file()
    for path in exp.rglob("*.py"):
        assert "__package__" not in path.read_text(), path


def test_every_results_folder_is_named_after_what_writes_it():
    from experiments.suites.compare import suites

    exp = ROOT / "experiments"
    scripts = {p.stem for role in ROLES for p in (exp / role).glob("*.py")} | {"gpu_check"}
    writers = scripts | set(suites()) | {"quickstart"}  # quickstart: gcgd-train --config quickstart
    folders = {p.name for p in (exp / "results").iterdir() if p.is_dir()}
    assert folders <= writers, sorted(folders - writers)


def test_one_lazy_export_mechanism():
    """Packages export names lazily through ``gcgd_jax._lazy.lazy_exports`` only: no
    hand-written module ``__getattr__``."""
    hand_written = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "gcgd_jax").rglob("*.py"))
        if path.name != "_lazy.py" and re.search(r"^def __getattr__\(", path.read_text(), re.M)
    ]
    assert not hand_written, f"use gcgd_jax._lazy.lazy_exports: {hand_written}"
