"""Deprecated alias of :mod:`gcgd_jax.ops` (the CPU-speed operations' old home).

Every old name still works -- reads and writes go to the module that now
defines it, so ``gcgd_jax.cpu_speed.CHUNKED_WGRAD = False`` still switches the
chunks off -- and importing this module warns once. Use
``gcgd_jax.ops.xla_flags``, ``.fusion``, ``.conv`` and ``.norm`` instead.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

_HOMES = {
    "CPU_CONV_FLAG": "gcgd_jax.ops.xla_flags",
    "apply_cpu_flags": "gcgd_jax.ops.xla_flags",
    "fusion_break": "gcgd_jax.ops.fusion",
    "CHUNKED_WGRAD": "gcgd_jax.ops.conv",
    "CUSTOM_CONV_VJP": "gcgd_jax.ops.conv",
    "WGRAD_CHUNKS": "gcgd_jax.ops.conv",
    "chunked_wgrad_conv": "gcgd_jax.ops.conv",
    "conv3x3": "gcgd_jax.ops.conv",
    "conv3x3_xla": "gcgd_jax.ops.conv",
    "FAST_GROUP_NORM": "gcgd_jax.ops.norm",
    "GN_EPSILON": "gcgd_jax.ops.norm",
    "GroupNorm": "gcgd_jax.ops.norm",
    "group_norm": "gcgd_jax.ops.norm",
}


class _Alias(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name not in _HOMES:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(_HOMES[name]), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES:
            setattr(importlib.import_module(_HOMES[name]), name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(_HOMES)


warnings.warn(
    "gcgd_jax.cpu_speed is deprecated: use gcgd_jax.ops (xla_flags, fusion, conv, norm).",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__].__class__ = _Alias
