"""The XLA CPU convolution flag, and setting it only when it is safe to.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` takes
individual convolutions off XLA's YNNPACK fusion path on the CPU backend, where
the default path runs a CIFAR ResNet's weight-gradient convolutions slowly.
Another convolution algorithm means other rounding (a few SGD steps later the
parameters differ from the default flags' at the 1e-3 relative level). How
much it buys depends on the CPU: ``docs/cpu_performance.md`` has the figures,
``python -m experiments.bench.bench_throughput`` measures it on yours.

XLA reads ``XLA_FLAGS`` once, when JAX's backends start, so the flag must be
set before anything computes; this module imports no JAX for that reason.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

__all__ = ["CPU_CONV_FLAG", "apply_cpu_flags"]

#: The flag :func:`apply_cpu_flags` sets.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

_MIN_JAXLIB = (0, 10)  # older XLA does not know the flag (and aborts on unknown flags)
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _accelerator_plugin_installed() -> bool:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith(_ACCELERATOR_PLUGINS):
            return True
    return False


def _backends_initialised() -> bool:
    """Whether XLA has read ``XLA_FLAGS`` already. Importing ``jax`` does not start
    its backends (the first computation or ``jax.devices()`` does), so an imported
    but idle JAX still takes the flag."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def apply_cpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Sets ``XLA_FLAGS`` to :data:`CPU_CONV_FLAG` when it is safe.

    When all of: the user has not set ``XLA_FLAGS`` (a user's own flags are
    never touched, not even appended to); JAX's backends are not initialised
    yet (XLA reads ``XLA_FLAGS`` once; an imported JAX that has not computed
    anything is fine); ``JAX_PLATFORMS`` is unset or names ``cpu`` and no
    accelerator plugin (``jax-cuda*-plugin``, ``jax-rocm*-plugin``, ``libtpu``)
    is installed (the flag only affects CPU compilation, and it has not been
    measured beside an accelerator); jaxlib is at least 0.10 (XLA aborts on a
    flag it does not know). The flag is experimental in XLA; if a future jaxlib
    rejects it, set ``XLA_FLAGS`` yourself (even empty) to switch this off.

    Args:
        environ: the environment to edit; ``os.environ`` by default.

    Returns:
        True when the flag was added, False when the environment was left alone.
    """
    env = os.environ if environ is None else environ
    if "XLA_FLAGS" in env:
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and "cpu" not in platforms.split(","):
        return False
    version = _jaxlib_version()
    if version is None or version < _MIN_JAXLIB:
        return False
    if _accelerator_plugin_installed() or _backends_initialised():
        return False
    env["XLA_FLAGS"] = CPU_CONV_FLAG
    return True
