"""Lazy package exports (PEP 562): a package names its public objects and the modules
that define them; a module is imported when one of its names is first used.

This keeps ``import gcgd_jax.models`` and the configuration code (which reads
:class:`gcgd_jax.models.GCODEConfig`'s fields) free of JAX until a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public ``name`` lives in the
    module ``exports[name]``, and whose ``submodules`` (``package.<name>``) are imported
    on first use too; a found name is cached in the package's namespace. The one
    mechanism of lazy exports in gcgd_jax."""
    namespace = importlib.import_module(package).__dict__
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports, *submodules})

    return __getattr__, __dir__
