"""The fusion breaker: one helper, used at the input of every residual block."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fusion_break"]


def fusion_break(x: jax.Array, fusion_breaker: jax.Array | None) -> jax.Array:
    """Divides ``x`` by the runtime scalar ``fusion_breaker`` (no-op when ``None``).

    The **only** implementation of the fusion breaker. It is applied at the input
    of every residual block (not inside the GC-ODE branches: measured there, it
    made no difference). The
    training step passes ``jnp.float32(1.0)`` as an argument of the jitted step;
    ``x / 1.0`` is exact, but XLA cannot see that the divisor is 1, so it cannot
    fold it, and the division stops XLA's CPU backend from copying each block's
    forward BatchNorm/ReLU/residual chain into the weight-gradient transposes --
    about 1.4x on a CPU ResNet-20 train step (see ``docs/cpu_performance.md``). A
    Python constant would be folded away and the gain lost. It relies on XLA
    fusion heuristics: keep it switchable (``None``) and measured.
    """
    if fusion_breaker is None:
        return x
    return x / jnp.asarray(fusion_breaker, x.dtype)
