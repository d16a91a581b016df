"""The XLA CPU flag the training entry points set before JAX starts.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` removes
"individual convolutions" from the set of operations that XLA's CPU backend
routes through its YNNPACK fusion path; convolutions then run through XLA's
other CPU convolution kernels. Measured on the project's 2-core machine with
jax/jaxlib 0.10.2 (``docs/cpu_performance.md``): a CIFAR ResNet-20
train step at batch 128 ran about 2.3x faster (profile: with default flags 58%
of the step was YNN weight-gradient convolutions). The numerics change
slightly, as with any other convolution algorithm: after 5 SGD steps at
lr 0.1 the parameters differed from the default flags' by relative L2 4e-3.

When it is added (:func:`apply_cpu_flags`), all of:

* the user has not set ``XLA_FLAGS`` (a user's own flags are never touched,
  not even appended to);
* JAX's backends are not initialised yet (XLA reads ``XLA_FLAGS`` once);
* ``JAX_PLATFORMS`` is unset or names ``cpu``, and no accelerator plugin
  (``jax-cuda*-plugin``, ``jax-rocm*-plugin``, ``libtpu``) is installed.
  The flag only affects CPU compilation, but it has not been measured on a
  machine with an accelerator, so it is not set there;
* jaxlib is at least 0.10 (the version it was measured on). XLA aborts on a
  flag it does not know, and older jaxlib releases may not define this one.

The flag is experimental in XLA and may disappear; if a future jaxlib rejects
it, set ``XLA_FLAGS`` yourself (any value, even empty) to switch this off.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

__all__ = ["CPU_CONV_FLAG", "apply_cpu_flags"]

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

_MIN_JAXLIB = (0, 10)
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
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def apply_cpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Sets ``XLA_FLAGS`` to :data:`CPU_CONV_FLAG` when it is safe (see module doc).

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
