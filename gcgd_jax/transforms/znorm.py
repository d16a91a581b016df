"""ZNorm: per-leaf z-score normalisation of the gradient."""

from __future__ import annotations

import optax

from gcgd_jax.transforms import _common


def znorm(eps: float = 1e-12) -> optax.GradientTransformation:
    r"""Z-score normalises each multi-dimensional gradient leaf.

    For every leaf with ``ndim >= 2``, over all of its elements,

    .. math:: \hat g = \frac{g - \operatorname{mean}(g)}{\operatorname{std}(g) + \epsilon},

    with the population standard deviation. Every such leaf comes out with
    mean 0 and standard deviation :math:`\approx 1`, whatever its scale. Where
    :math:`\operatorname{std}(g) + \epsilon = 0` (a constant leaf with
    ``eps=0``) the update is 0, not NaN. Leaves with ``ndim < 2`` (biases,
    BatchNorm scales) and leaves whose dtype is not a real floating type
    (integer, boolean, ``float0``, complex) pass through untouched.
    Statistics are taken in at least float32; the update keeps the leaf's
    dtype. Apply it to the raw gradient, before the optimizer (the authors use
    it with Adam). Note that the step size then no longer shrinks with the
    gradient, so plain SGD needs a decaying learning rate to settle.

    Args:
      eps: added to the standard deviation; ``>= 0`` (checked when concrete).
        May be injected with ``optax.inject_hyperparams``.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gcgd_jax.transforms.znorm import znorm
      >>> tx = znorm()
      >>> g = {"kernel": jnp.array([[1.0, 3.0], [1.0, 3.0]]), "bias": jnp.array([5.0])}
      >>> out, _ = tx.update(g, tx.init(g))
      >>> out["kernel"].tolist(), out["bias"].tolist()
      ([[-1.0, 1.0], [-1.0, 1.0]], [5.0])

    References:
      Yun et al, `ZNorm: Z-Score Gradient Normalization for Deep Neural Networks
      <https://arxiv.org/abs/2408.01215>`_, 2024
    """
    _common.check_number("eps", eps, lower=0.0)

    def normalise(path, g):
        del path
        centred = g - g.mean()
        return _common.safe_divide(centred, g.std() + eps)

    def update_fn(updates, state, params=None):
        del params
        return _common.map_float_leaves(normalise, updates, min_ndim=2), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
