"""AGR: adaptive gradient regularization."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common


def agr(
    eps: float = 1e-12, *, leaves: Literal["kernels", "all"] = "kernels"
) -> optax.GradientTransformation:
    r"""Adaptive gradient regularization: shrinks each entry by its share of the leaf.

    For every selected leaf (by default the kernels, ``ndim >= 2``: conv and
    dense weights), with sums over all of its elements,

    .. math::
        \hat g = g \odot \Bigl(1 - \frac{|g|}{\sum |g| + \epsilon}\Bigr).

    The coefficient lies in ``[0, 1]``: an entry holding a large share of the
    leaf's total magnitude is shrunk most. For large leaves the shares average
    ``1/n``, so AGR is then close to the identity. A leaf with a single non-zero
    entry is (almost) zeroed.

    Why kernels only by default: on a leaf with few elements the shares are
    large, and the coordinate that dominates the gradient is slowed the most --
    with two elements its coefficient tends to 0 as the other one vanishes, so
    SGD on optax's own Rosenbrock target never converges, and on a scalar leaf
    the update is always 0. Biases, BatchNorm scales and other 1-D leaves pass
    through unchanged unless ``leaves="all"`` (every leaf, as in the paper's code). An all-zero leaf stays exactly zero and never
    produces NaN, even with ``eps=0`` (the official code divides 0 by 0 there).
    Leaves whose dtype is not a real floating type (integer, boolean,
    ``float0``, complex) pass through untouched. Sums are taken in at least
    float32; the update keeps the leaf's dtype. Apply it to the raw gradient,
    before the optimizer's moments.

    Args:
      eps: added to the denominator; ``>= 0`` (checked when concrete). May be
        injected with ``optax.inject_hyperparams``.
      leaves: ``"kernels"`` (leaves with ``ndim >= 2``; others pass through
        unchanged) or ``"all"`` (every float leaf, scalars included). A string,
        so ``optax.inject_hyperparams`` leaves it static.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gcgd_jax.transforms.agr import agr
      >>> tx = agr(eps=0.0)
      >>> g = {"w": jnp.array([[1.0, -3.0]]), "b": jnp.array([1.0, -3.0])}
      >>> out, _ = tx.update(g, tx.init(g))
      >>> out["w"].tolist(), out["b"].tolist()  # the 1-D leaf passes through
      ([[0.75, -0.75]], [1.0, -3.0])

    References:
      Jiang et al, `Adaptive Gradient Regularization: A Faster and Generalizable
      Optimization Technique for Deep Neural Networks
      <https://arxiv.org/abs/2407.16944>`_, 2024
    """
    _common.check_number("eps", eps, lower=0.0)
    if leaves not in ("kernels", "all"):
        raise ValueError(f"`leaves` must be 'kernels' or 'all', got {leaves!r}")
    min_ndim = 2 if leaves == "kernels" else 0

    def regularise(path, g):
        del path
        magnitude = jnp.abs(g)
        return g * (1 - _common.safe_divide(magnitude, magnitude.sum() + eps))

    def update_fn(updates, state, params=None):
        del params
        return _common.map_float_leaves(regularise, updates, min_ndim=min_ndim), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
