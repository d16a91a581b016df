"""The vector field ``phi(z, t)`` of a GC-ODE branch and its time-conditioned convolution.

``phi`` is GroupNorm -> ReLU -> conv3x3 on ``[z, t]`` (-> GroupNorm -> ReLU ->
conv3x3 on ``[., t]``) -> GroupNorm; the time input is the constant channel
``1 + t``, so that it contributes (and is trained) at every evaluation,
``t = 0`` included (a one-step Euler solve evaluates only there). The
convolution and GroupNorm are :mod:`gcgd_jax.ops`' (hand-written VJP, two-stage
reduction; switchable).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gcgd_jax.ops import conv as conv_ops
from gcgd_jax.ops.conv import conv3x3
from gcgd_jax.ops.norm import group_norm

__all__ = ["ODEVectorField", "TimeConv"]


def _num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is at most
    ``min(32, channels // 2)`` (groups of >= 2 channels where possible)."""
    cap = max(1, min(32, channels // 2))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def field_group_norm(channels: int, *, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.Module:
    """GroupNorm over ``channels`` with the largest group count the field uses (see above)."""
    return group_norm(channels, _num_groups(channels), zero_scale=zero_scale, rngs=rngs)


class TimeConv(nnx.Module):
    """3x3 convolution of ``[a, t]`` (``t`` as an extra constant input channel).

    The kernel has shape ``(3, 3, C_in + 1, C_out)`` exactly as a convolution of
    the concatenation would; the time channel holds ``1 + t`` (so that it is
    used, and trained, at ``t = 0`` too). By linearity it is evaluated as
    ``conv(a, K[..., :C_in, :]) + (1 + t) * conv(1, K[..., C_in:, :])`` -- identical
    values (zero padding included), but the big convolution keeps ``C_in``
    input channels instead of ``C_in + 1`` and no concatenated copy is made.
    Both use :func:`gcgd_jax.ops.conv3x3` (its hand-written VJP unless
    ``gcgd_jax.ops.conv.CUSTOM_CONV_VJP`` was off when the module was built).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.custom_vjp = conv_ops.CUSTOM_CONV_VJP
        init = nnx.initializers.he_normal()
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, in_features + 1, out_features)))

    def __call__(self, a: jax.Array, t: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(a.dtype)
        y = conv3x3(a, kernel[:, :, : self.in_features, :], custom_vjp=self.custom_vjp)
        ones = jnp.ones((1, *a.shape[1:3], 1), a.dtype)
        y_t = conv3x3(ones, kernel[:, :, self.in_features :, :], custom_vjp=self.custom_vjp)
        return y + (1 + jnp.asarray(t, a.dtype)) * y_t


class ODEVectorField(nnx.Module):
    """``phi(z, t)``: GroupNorm -> ReLU -> conv3x3[z, t] (-> GroupNorm -> ReLU ->
    conv3x3[., t]) -> GroupNorm. One conv when ``width is None``, two through
    ``width`` channels otherwise. The last GroupNorm's scale starts at zero, so
    ``phi = 0`` and ``z(1) = z(0)`` at initialisation (a smooth start: the
    branch's Jacobian is the projection's). No BatchNorm inside the solve."""

    def __init__(self, channels: int, width: int | None, *, rngs: nnx.Rngs):
        self.norm_in = field_group_norm(channels, rngs=rngs)
        if width is None:
            self.conv1 = TimeConv(channels, channels, rngs=rngs)
            self.norm_mid = None
            self.conv2 = None
        else:
            self.conv1 = TimeConv(channels, width, rngs=rngs)
            self.norm_mid = field_group_norm(width, rngs=rngs)
            self.conv2 = TimeConv(width, channels, rngs=rngs)
        self.norm_out = field_group_norm(channels, rngs=rngs, zero_scale=True)

    def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
        a = self.conv1(jax.nn.relu(self.norm_in(z)), t)
        if self.conv2 is not None:
            a = self.conv2(jax.nn.relu(self.norm_mid(a)), t)
        return self.norm_out(a)
