"""Weight perturbation (FG-W): the forward gradient over all weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gcgd_jax.estimators import _common

__all__ = ["Credited", "weight_perturbation"]


class Credited(NamedTuple):
    """A loss with per-parameter credits, returned by a loss function given to
    :func:`weight_perturbation` instead of a scalar (local-loss FG-W).

    ``credits`` has the structure of the parameters; each leaf is broadcastable
    to its parameter and holds the part of the loss that parameter is credited
    with (e.g. its block's, or its group's, local loss). Parameter
    :math:`\\theta_i` is then estimated as :math:`(\\nabla c_i \\cdot v)\\, v_i`,
    unbiased when :math:`\\partial L / \\partial \\theta_i = \\partial c_i /
    \\partial \\theta_i` (no other loss term depends on :math:`\\theta_i`).
    """

    loss: jax.Array  # () float: the objective (reported as the value).
    credits: Any  # params-shaped tree of arrays broadcastable to each leaf.


def _exact_leaves(exact: Any, params: Any) -> list[bool]:
    if exact is None:
        return [False] * len(jax.tree.leaves(params))
    mask = exact(params) if callable(exact) else exact
    flags = jax.tree.leaves(mask)
    if jax.tree.structure(mask) != jax.tree.structure(params):
        raise ValueError("`exact` must have the structure of the parameters (one bool per leaf).")
    return [bool(f) for f in flags]


def weight_perturbation(
    loss_fn: Callable[..., Any],
    num_directions: int = 1,
    *,
    has_aux: bool = False,
    exact: Any = None,
) -> Callable[..., Any]:
    r"""Forward gradient by weight perturbation (FG-W): a ``value_and_grad``
    replacement that uses forward-mode differentiation only.

    With :math:`v \sim \mathcal N(0, I)` over every parameter, the directional
    derivative :math:`\nabla L \cdot v` is one ``jax.jvp`` (one forward pass,
    no reverse pass), and

    .. math::

        \hat g = \frac{1}{K} \sum_{k=1}^{K} (\nabla L \cdot v_k)\, v_k,
        \qquad \mathbb E[\hat g] = \nabla L,

    with total variance :math:`\mathbb E\lVert \hat g - \nabla L \rVert^2 =
    (N + 1) \lVert \nabla L \rVert^2 / K` over :math:`N` parameters. The
    :math:`K` directions are vmapped ``jax.jvp`` calls. With isotropic
    directions this is also the "directional descent" baseline of Singhal et
    al. (Polyak; Spall).

    Two options serve local losses (Ren et al.'s LG-FG-W):

    * ``loss_fn`` may return a :class:`Credited` loss: each leaf's directional
      derivative is then that of its own credit (e.g. its block's and group's
      local loss), which removes the other blocks' noise;
    * ``exact`` marks leaves whose gradient is computed exactly by reverse mode
      (``jax.grad`` with respect to those leaves only); it is meant for linear
      heads at the end of the network, where that reverse pass crosses one
      layer, as in the official code (which trains its classifier heads with
      local exact gradients). Their directions are zero.

    Args:
        loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar, a
            :class:`Credited`, or ``(either, aux)`` when ``has_aux``. It must be
            differentiable in forward mode; no reverse pass is taken through it
            (except for ``exact`` leaves).
        num_directions: :math:`K \ge 1`, the number of directions averaged
            (static).
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        exact: ``None``, a tree of bools with the structure of the params, or a
            callable ``params -> tree of bools``. Static (Python bools).

    Returns:
        ``estimate(params, *args, key, **kwargs)`` returning ``(value, grads)``
        or ``((value, aux), grads)`` when ``has_aux``: the unperturbed loss (and
        aux) and the estimate, structured and typed like ``params``. ``key`` is a
        PRNG key (keyword-only). It can be jitted.

    Raises:
        ValueError: if ``num_directions`` < 1 or ``exact`` does not match.
        TypeError: if ``num_directions`` is not an int, or a params leaf is not
            floating point.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gcgd_jax.estimators import weight_perturbation
        >>> loss = lambda w, a: 0.5 * jnp.sum((w - a) ** 2)  # gradient w - a
        >>> estimate = jax.jit(weight_perturbation(loss, num_directions=4096))
        >>> value, g = estimate(jnp.ones(3), jnp.zeros(3), key=jax.random.key(0))
        >>> print(value, jnp.allclose(g, 1.0, atol=0.2))  # the mean of 4096 estimates
        1.5 True

    References:
        Baydin et al., `Gradients without Backpropagation
        <https://arxiv.org/abs/2202.08587>`_, 2022

        Ren, Kornblith, Liao and Hinton, `Scaling Forward Gradient With Local
        Losses <https://arxiv.org/abs/2210.03310>`_, ICLR 2023
    """
    num_directions = _common.check_num_directions(num_directions)

    def estimate(params: Any, *args: Any, key: jax.Array, **kwargs: Any) -> Any:
        _common.check_float_leaves(params, "The parameters")
        leaves, treedef = jax.tree.flatten(params)
        exact_flags = _exact_leaves(exact, params)
        shape = jax.eval_shape(lambda p: loss_fn(p, *args, **kwargs), params)
        credited = isinstance(shape[0] if has_aux else shape, Credited)

        def split(out: Any) -> tuple[Any, Any, Any]:
            value, aux = out if has_aux else (out, None)
            if credited:
                return value.credits, value.loss, aux
            return value, value, aux

        def tangent_fn(p: Any) -> tuple[Any, Any]:
            credits, value, aux = split(loss_fn(p, *args, **kwargs))
            return credits, (value, aux)

        def one_direction(k: jax.Array) -> tuple[Any, Any]:
            v_leaves = jax.tree.leaves(_common.normal_like(k, params))
            v_leaves = [
                jnp.zeros_like(v) if is_exact else v for v, is_exact in zip(v_leaves, exact_flags)
            ]
            tangents = jax.tree.unflatten(
                treedef, [v.astype(jnp.result_type(x)) for v, x in zip(v_leaves, leaves)]
            )
            _, d, primal = jax.jvp(tangent_fn, (params,), (tangents,), has_aux=True)
            d_leaves = jax.tree.leaves(d) if credited else [d] * len(leaves)
            g = [dd.astype(v.dtype) * v for dd, v in zip(d_leaves, v_leaves)]
            return g, primal

        keys = jax.random.split(key, num_directions)
        g_leaves, (value, aux) = jax.vmap(one_direction, out_axes=(0, None))(keys)
        g_leaves = [jnp.mean(g, axis=0) for g in g_leaves]

        if any(exact_flags):
            exact_leaves = [x for x, is_exact in zip(leaves, exact_flags) if is_exact]

            def on_exact(sub: list[jax.Array]) -> jax.Array:
                it = iter(sub)
                merged = [next(it) if e else x for x, e in zip(leaves, exact_flags)]
                return split(loss_fn(jax.tree.unflatten(treedef, merged), *args, **kwargs))[1]

            it = iter(jax.grad(on_exact)(exact_leaves))
            g_leaves = [next(it) if e else g for g, e in zip(g_leaves, exact_flags)]

        grads = jax.tree.unflatten(
            treedef, [g.astype(jnp.result_type(x)) for g, x in zip(g_leaves, leaves)]
        )
        return ((value, aux), grads) if has_aux else (value, grads)

    return estimate
