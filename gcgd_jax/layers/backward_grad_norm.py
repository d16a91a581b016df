"""Backward gradient normalization: identity forward, normalised gradient backward.

It acts on the gradient flowing back through an activation, at a chosen point
of a network, so it is a function with a custom VJP (and a Flax NNX module to
place it in a model), not an optax transform.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gcgd_jax.transforms import _common


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _backward_grad_norm(x, eps, axes):
    del eps, axes  # Only the backward pass uses them.
    return x


def _backward_grad_norm_fwd(x, eps, axes):
    return x, eps


def _backward_grad_norm_bwd(axes, eps, g):
    # Half-precision gradients: norm in float32, hand back g's dtype.
    compute_dtype = jnp.promote_types(g.dtype, jnp.float32)
    g32 = g.astype(compute_dtype)
    n = math.prod(g.shape[a] for a in axes)
    norm = jnp.sqrt(jnp.sum(jnp.square(g32), axis=axes, keepdims=True))
    scale = jnp.sqrt(jnp.asarray(n, compute_dtype)) / (norm + jnp.asarray(eps, compute_dtype))
    # eps is a hyperparameter: no gradient.
    return (g32 * scale).astype(g.dtype), None


_backward_grad_norm.defvjp(_backward_grad_norm_fwd, _backward_grad_norm_bwd)


def _normalise_axes(ndim: int, axes: int | Sequence[int] | None) -> tuple[int, ...]:
    if axes is None:
        if ndim < 1:
            raise ValueError("`x` needs a batch axis (axis 0); got a scalar.")
        return tuple(range(1, ndim))
    axes_tuple = (axes,) if isinstance(axes, int) else tuple(axes)
    if not all(type(a) is int and -ndim <= a < ndim for a in axes_tuple):
        raise ValueError(f"`axes` must be integers in [-{ndim}, {ndim}); got {axes!r}.")
    normalised = tuple(sorted(a % ndim for a in axes_tuple))
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"`axes` must not repeat an axis; got {axes!r}.")
    return normalised


def backward_grad_norm(
    x: jax.Array, *, eps: float = 1e-6, axes: int | Sequence[int] | None = None
) -> jax.Array:
    r"""Identity in the forward pass; normalises the gradient in the backward pass.

    The forward pass returns ``x`` unchanged. The cotangent :math:`g` arriving
    at ``x`` is replaced by

    .. math::

        \hat g = \sqrt{n} \, \frac{g}{\lVert g \rVert_2 + \epsilon},

    where the norm is taken separately for every sample, over all non-batch
    axes (axis 0 is the batch) by default, or over ``axes`` when given, and
    :math:`n` is the number of elements in the normalised axes (so :math:`\hat g`
    has root-mean-square 1 on each normalised slice). A zero gradient stays zero.

    Args:
        x: the activation, batch on axis 0 (unless ``axes`` says otherwise).
        eps: :math:`\epsilon > 0`, added to the norm. May be traced.
        axes: the axes of one normalised slice; ``None`` (default) means every
            axis but 0. The paper's exact axes are not confirmed (the default
            follows third-party implementations), hence the argument. Static.

    Returns:
        ``x``, unchanged; its gradient is normalised. The gradient keeps the
        dtype of ``x`` (the norm is computed in float32 for half precision).

    Raises:
        ValueError: if ``eps`` is not positive, ``axes`` names an axis ``x``
            does not have or repeats one, or ``x`` is a scalar with
            ``axes=None``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gcgd_jax.layers.backward_grad_norm import backward_grad_norm
        >>> x = jnp.ones((2, 4))
        >>> scale = jnp.array([[3.0], [0.01]])
        >>> g = jax.grad(lambda x: jnp.sum(scale * backward_grad_norm(x)))(x)
        >>> print(jnp.round(jnp.linalg.norm(g, axis=1), 3))  # sqrt(4) per sample
        [2. 2.]

    References:
        Cabana and Lago-Fernández, `Backward Gradient Normalization in Deep Neural
        Networks <https://arxiv.org/abs/2106.09475>`_, 2021
    """
    x = jnp.asarray(x)
    axes = _normalise_axes(x.ndim, axes)
    _common.check_number("eps", eps, lower=0.0, inclusive=False)
    return _backward_grad_norm(x, eps, axes)


class BackwardGradNorm(nnx.Module):
    """Flax NNX module: :func:`backward_grad_norm` at this point of a model.

    It has no parameters. Example::

        model = nnx.Sequential(
            nnx.Linear(8, 16, rngs=rngs), nnx.relu, BackwardGradNorm(), nnx.Linear(16, 2, rngs=rngs)
        )

    Args:
        eps: :math:`\\epsilon > 0`, added to the gradient norm.
        axes: the normalised axes; ``None`` (default) means every axis but 0.
    """

    def __init__(self, eps: float = 1e-6, axes: int | Sequence[int] | None = None):
        _common.check_number("eps", eps, lower=0.0, inclusive=False)
        self.eps = eps
        self.axes = axes if axes is None or isinstance(axes, int) else tuple(axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return backward_grad_norm(x, eps=self.eps, axes=self.axes)
