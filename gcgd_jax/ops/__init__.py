"""Operations that make XLA's CPU backend fast, each in a module named for what it is.

* :mod:`gcgd_jax.ops.xla_flags` -- :func:`apply_cpu_flags` sets the XLA CPU
  convolution flag :data:`CPU_CONV_FLAG` when that is safe (imports no JAX: it
  must run before JAX starts);
* :mod:`gcgd_jax.ops.fusion` -- :func:`fusion_break`, the runtime ``1.0`` that
  stops XLA copying forward chains into the backward pass;
* :mod:`gcgd_jax.ops.conv` -- :func:`conv3x3` (GC-ODE's 3x3 convolution with a
  hand-written VJP) and :func:`chunked_wgrad_conv` (the ResNets' convolution,
  weight gradient summed over batch chunks);
* :mod:`gcgd_jax.ops.norm` -- :class:`GroupNorm`, GC-ODE's two-stage group norm.

Each is switchable. The models' switches are attributes of the module that
defines them, read when a model is built: ``gcgd_jax.ops.conv.CHUNKED_WGRAD``,
``gcgd_jax.ops.conv.WGRAD_CHUNKS``, ``gcgd_jax.ops.conv.CUSTOM_CONV_VJP``,
``gcgd_jax.ops.norm.FAST_GROUP_NORM`` (set them there, e.g.
``gcgd_jax.ops.conv.CHUNKED_WGRAD = False``; this package does not re-export
them, so that there is one place to set each). The flag is off when you set
``XLA_FLAGS`` yourself, the fusion breaker with ``run.fusion_breaker=off``.
What each buys and costs, measured: ``docs/cpu_performance.md``.

Names are imported on first use, so ``from gcgd_jax.ops import apply_cpu_flags``
does not import JAX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcgd_jax._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "CPU_CONV_FLAG": "gcgd_jax.ops.xla_flags",
    "apply_cpu_flags": "gcgd_jax.ops.xla_flags",
    "fusion_break": "gcgd_jax.ops.fusion",
    "chunked_wgrad_conv": "gcgd_jax.ops.conv",
    "conv3x3": "gcgd_jax.ops.conv",
    "conv3x3_xla": "gcgd_jax.ops.conv",
    "GroupNorm": "gcgd_jax.ops.norm",
    "group_norm": "gcgd_jax.ops.norm",
}
__all__ = sorted(_EXPORTS, key=lambda n: (not n.isupper(), n))
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # static analysers see the eager imports
    from gcgd_jax.ops.conv import chunked_wgrad_conv, conv3x3, conv3x3_xla
    from gcgd_jax.ops.fusion import fusion_break
    from gcgd_jax.ops.norm import GroupNorm, group_norm
    from gcgd_jax.ops.xla_flags import CPU_CONV_FLAG, apply_cpu_flags
