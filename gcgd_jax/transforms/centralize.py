"""Gradient centralization for Flax-layout kernels."""

from __future__ import annotations

import optax

from gcgd_jax.transforms import _common


def centralize(*, axis: int = -1, conv_only: bool = False) -> optax.GradientTransformation:
    r"""Gradient centralization: removes the fan-in mean of each output unit.

    For every leaf with ``ndim >= 2`` (``ndim >= 4`` with ``conv_only``) and
    each output unit :math:`o` (an index along ``axis``),

    .. math::
        \hat g_{\ldots o \ldots} = g_{\ldots o \ldots}
            - \operatorname{mean}_{\text{fan-in}}(g_{\ldots o \ldots}),

    where the mean runs over every axis except ``axis``. Leaves with fewer
    dimensions (biases, BatchNorm scales) and leaves whose dtype is not a real
    floating type (integer, boolean, ``float0``, complex) pass through
    untouched. The mean is taken in at least float32; the update keeps the
    leaf's dtype.

    The default ``axis=-1`` is Flax's layout: conv kernels ``(kh, kw, in, out)``
    and dense kernels ``(in, out)``. :func:`optax.centralize` reduces axes
    ``1..n`` instead, which is right for PyTorch's ``(out, in, kh, kw)`` but
    centres *across* output units on Flax kernels; ``centralize(axis=0)``
    matches it on leaves with ``ndim >= 2``.

    The authors centre the SGD gradient after (coupled) weight decay is added;
    for Adam they recommend centring the final update, i.e. placing this after
    ``optax.scale_by_adam``.

    Args:
      axis: the output-unit axis; every other axis is fan-in. A leaf for which
        ``axis`` is out of range raises ``ValueError`` naming it. Static: with
        ``optax.inject_hyperparams`` pass ``static_args=("axis",)``.
      conv_only: centre only leaves with ``ndim >= 4`` (2-D conv kernels).

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from gcgd_jax.transforms.centralize import centralize
      >>> tx = optax.chain(centralize(), optax.sgd(0.1))  # typical use
      >>> grads = {"kernel": jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]]),
      ...          "bias": jnp.ones((2,))}
      >>> updates, _ = centralize().update(grads, optax.EmptyState())
      >>> updates["kernel"].tolist()
      [[-1.0, -1.0], [0.0, -1.0], [1.0, 2.0]]
      >>> updates["bias"].tolist()
      [1.0, 1.0]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, 2020
    """
    axis = _common.check_axis(axis)
    min_ndim = 4 if conv_only else 2

    def centre(path, g):
        return g - g.mean(axis=_common.fan_in_axes(g.ndim, axis, path), keepdims=True)

    def update_fn(updates, state, params=None):
        del params
        return _common.map_float_leaves(centre, updates, min_ndim=min_ndim), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
