"""Convolutions whose VJPs are written so that XLA's CPU backend runs them fast.

Two operations, each with a switch read when a model is built (a built model
keeps what it was built with):

* :func:`conv3x3` -- GC-ODE's 3x3 convolution with a hand-written VJP. Inside a
  ``while`` loop body XLA's CPU backend can leave the weight-gradient
  convolution in a non-canonical layout and run it through a slow generic
  kernel (cf. jax-ml/jax#12868); the VJP here writes both backward
  convolutions in the canonical NHWC/HWIO form, with explicit transposes, as
  XLA itself does outside loops. Switch: :data:`CUSTOM_CONV_VJP`.
* :func:`chunked_wgrad_conv` -- the ResNets' convolution, whose weight gradient
  is the sum of per-chunk weight gradients over batch chunks. XLA's CPU backend
  runs one weight-gradient convolution on a single core; independent chunks
  run on all of them. Switches: :data:`CHUNKED_WGRAD`, :data:`WGRAD_CHUNKS`.

Both give the values and gradients of ``jax.lax.conv_general_dilated`` up to
float rounding (another summation order; tested to 1e-5). Both are
``jax.custom_vjp`` functions, so forward-mode differentiation (``jax.jvp``)
through a model built with them is not available; build it inside
:func:`xla_convolutions` for that (``gcgd-train`` does so for a forward-mode
``gradient.estimator``). What each buys: ``docs/cpu_performance.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "CHUNKED_WGRAD",
    "CUSTOM_CONV_VJP",
    "WGRAD_CHUNKS",
    "chunked_wgrad_conv",
    "conv3x3",
    "conv3x3_xla",
    "xla_convolutions",
]

#: GC-ODE's 3x3 convolutions use the hand-written VJP of :func:`conv3x3` (read
#: when a GC-ODE model is built). ``False``: XLA's own VJP.
CUSTOM_CONV_VJP: bool = True
#: ResNet convolutions use :func:`chunked_wgrad_conv` (read when a ResNet is
#: built). ``False``: ``jax.lax.conv_general_dilated`` and XLA's own VJP.
CHUNKED_WGRAD: bool = True
#: How many batch chunks the weight gradient is split into (at most).
WGRAD_CHUNKS: int = 8


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Models built inside this block use ``jax.lax.conv_general_dilated`` and XLA's own
    VJPs (both switches off), so ``jax.jvp`` can differentiate them; the switches are
    restored on exit."""
    global CHUNKED_WGRAD, CUSTOM_CONV_VJP
    saved = CHUNKED_WGRAD, CUSTOM_CONV_VJP
    CHUNKED_WGRAD = CUSTOM_CONV_VJP = False
    try:
        yield
    finally:
        CHUNKED_WGRAD, CUSTOM_CONV_VJP = saved


_DN = ("NHWC", "HWIO", "NHWC")
_PAD = ((1, 1), (1, 1))


# ----------------------------------------------------------------------------- conv3x3


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, NHWC / HWIO, differentiated by XLA."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), _PAD, dimension_numbers=_DN)


def _conv3x3_fwd(x, kernel):
    return conv3x3_xla(x, kernel), (x, kernel)


def _conv3x3_kernel_grad(x, dy):
    # dk[a, b, i, o] = sum_{n,h,w} xpad[n, h + a, w + b, i] dy[n, h, w, o]: a convolution
    # with C_in as "batch", N as "features" and dy as an (H, W, N, C_out) kernel.
    return jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), _PAD, dimension_numbers=_DN
    ).transpose(1, 2, 0, 3)


def _conv3x3_bwd(res, dy):
    x, kernel = res
    # dx: correlate dy with the spatially flipped kernel, in/out swapped.
    dx = conv3x3_xla(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    return dx, _conv3x3_kernel_grad(x, dy).astype(kernel.dtype)


_conv3x3_custom_vjp = jax.custom_vjp(conv3x3_xla)
_conv3x3_custom_vjp.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array, *, custom_vjp: bool = True) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, NHWC / HWIO, with a hand-written VJP.

    Values and gradients are those of ``jax.lax.conv_general_dilated`` (tested).
    The VJP writes both backward convolutions in the canonical NHWC/HWIO form,
    which XLA's CPU backend runs fast inside ``while`` loop bodies too (where
    diffrax's solves run). ``custom_vjp=False`` is :func:`conv3x3_xla`.
    """
    if not custom_vjp:
        return conv3x3_xla(x, kernel)
    return _conv3x3_custom_vjp(x, kernel)


# ----------------------------------------------------------------------------- chunked wgrad


def _chunks(batch: int) -> int:
    """The largest divisor of ``batch`` that is at most :data:`WGRAD_CHUNKS`."""
    return max(k for k in range(1, max(WGRAD_CHUNKS, 1) + 1) if batch % k == 0)


def _chunking_applies() -> bool:
    """One CPU device only: with two (fake) CPU devices and a batch-sharded GC-ODE
    step, XLA aborted intermittently with the chunks; with one device it never did."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def chunked_wgrad_conv(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated`` whose weight gradient is summed over batch chunks.

    A drop-in for the ``conv_general_dilated`` argument of ``nnx.Conv``: the
    same arguments, the same values. Its VJP gives the input gradient as XLA
    does and the kernel gradient as the sum, over ``k`` equal chunks of the
    batch (``k`` the largest divisor of the batch size up to
    :data:`WGRAD_CHUNKS`), of each chunk's kernel gradient -- mathematically
    the same sum, in another order, which XLA's CPU backend runs on all cores
    instead of one. On other backends, with more than one device, or when
    ``k == 1``, it is ``jax.lax.conv_general_dilated`` itself. The batch is the
    leading dimension of ``lhs`` (NHWC, as ``nnx.Conv`` calls it).
    """

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, *args, **kwargs)

    k = _chunks(lhs.shape[0]) if _chunking_applies() else 1
    if k == 1:
        return conv(lhs, rhs)

    @jax.custom_vjp
    def chunked(x: jax.Array, w: jax.Array) -> jax.Array:
        return conv(x, w)

    def fwd(x: jax.Array, w: jax.Array):
        return conv(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        dx = jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
        dw = None
        for xc, dyc in zip(jnp.split(x, k), jnp.split(dy, k), strict=True):
            part = jax.vjp(lambda w, xc=xc: conv(xc, w), w)[1](dyc)[0]
            dw = part if dw is None else dw + part
        return dx, dw

    chunked.defvjp(fwd, bwd)
    return chunked(lhs, rhs)
