"""The fusion breaker: a residual block's input divided by a runtime ``1.0``.

On XLA's CPU backend, without it, each block's forward BatchNorm/ReLU/residual
chain is copied into the weight-gradient transposes of the backward pass
(``lax.optimization_barrier`` is removed before fusion there, so it does not
help). A division by a value XLA cannot see is 1 -- an argument of the jitted
step -- stops that copying. ``x / 1.0`` is exact, so the step's values are
bit-identical with or without it (tested); what it buys rests on XLA's fusion
heuristics, so it stays switchable and measured (``docs/cpu_performance.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fusion_break"]


def fusion_break(x: jax.Array, fusion_breaker: jax.Array | None) -> jax.Array:
    """Divides ``x`` by the runtime scalar ``fusion_breaker`` (no-op when ``None``).

    The only implementation of the fusion breaker; the ResNets apply it at the
    input of every residual block (not inside GC-ODE's branches, where it made
    no difference). The training step passes ``jnp.float32(1.0)`` as an
    argument of the jitted step: a Python constant would be folded away by XLA
    and the effect lost. ``run.fusion_breaker`` switches it (``"auto"``: on for
    CPU devices only); a model called with ``fusion_breaker=None`` skips it.
    """
    if fusion_breaker is None:
        return x
    return x / jnp.asarray(fusion_breaker, x.dtype)
