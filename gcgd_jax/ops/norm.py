"""GroupNorm as a two-stage reduction, which XLA's CPU backend runs fast.

:class:`GroupNorm` has the maths and parameters of ``nnx.GroupNorm`` with
``use_fast_variance`` (equal within 1e-4, tested), computed as per-(sample,
channel) sums over ``H, W`` first and then over each group's channels, with
statistics in at least float32. On the CPU its forward + backward is about
twice as fast as ``nnx.GroupNorm``'s for small groups (``docs/cpu_performance.md``).
GC-ODE builds its group norms through :func:`group_norm`, which reads the switch
:data:`FAST_GROUP_NORM` when a model is built.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["FAST_GROUP_NORM", "GN_EPSILON", "GroupNorm", "group_norm"]

#: GC-ODE builds its group norms as :class:`GroupNorm` (read when a GC-ODE model
#: is built). ``False``: ``nnx.GroupNorm`` with the same parameters.
FAST_GROUP_NORM: bool = True
#: The epsilon of both group norms.
GN_EPSILON = 1e-5


class GroupNorm(nnx.Module):
    """Group normalisation over ``(H, W, channels of a group)`` for NHWC inputs.

    Args:
        num_features: channels (the last axis).
        num_groups: groups; must divide ``num_features``.
        epsilon: added to the variance.
        zero_scale: start ``scale`` at zeros (the module then outputs ``bias``).
        rngs: unused (the initialisation is constant); accepted like ``nnx.GroupNorm``'s.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        *,
        epsilon: float = GN_EPSILON,
        zero_scale: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # deterministic initialisation
        if num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={num_features}.")
        self.num_features, self.num_groups, self.epsilon = num_features, num_groups, epsilon
        init = jnp.zeros if zero_scale else jnp.ones
        self.scale = nnx.Param(init((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # f32 statistics (f64 kept)
        axes = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * (c // g)
        s1 = jnp.sum(xf, axis=axes).reshape(n, g, c // g).sum(-1)  # (N, G)
        s2 = jnp.sum(jnp.square(xf), axis=axes).reshape(n, g, c // g).sum(-1)
        mean = s1 / count
        var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        mean, inv = jnp.repeat(mean, c // g, axis=1), jnp.repeat(inv, c // g, axis=1)  # (N, C)
        mul = inv * self.scale[...].astype(xf.dtype)
        add = self.bias[...].astype(xf.dtype) - mean * mul
        bshape = (n,) + (1,) * (x.ndim - 2) + (c,)
        return (xf * mul.reshape(bshape) + add.reshape(bshape)).astype(x.dtype)


def group_norm(
    num_features: int,
    num_groups: int,
    *,
    zero_scale: bool = False,
    fast: bool | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A group norm over NHWC inputs: :class:`GroupNorm` (``fast``), else ``nnx.GroupNorm``.

    ``fast=None`` reads :data:`FAST_GROUP_NORM`. Both have the parameters
    ``scale`` (ones, or zeros with ``zero_scale``) and ``bias`` (zeros), float32,
    and epsilon :data:`GN_EPSILON`. Neither draws from ``rngs`` (their
    initialisation is constant), so the choice leaves every other parameter's
    initialisation as it is.
    """
    if FAST_GROUP_NORM if fast is None else fast:
        return GroupNorm(num_features, num_groups, zero_scale=zero_scale, rngs=rngs)
    init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
    return nnx.GroupNorm(
        num_features,
        num_groups=num_groups,
        epsilon=GN_EPSILON,
        scale_init=init,
        rngs=nnx.Rngs(0),  # not `rngs`: nnx.GroupNorm would draw (and not use) a key from it
    )
