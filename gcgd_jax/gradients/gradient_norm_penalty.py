"""Gradient-norm penalty: the gradient of L + lambda * ||grad L||, first order.

It needs a second gradient evaluation at a perturbed point, so it wraps the
loss function (like ``jax.value_and_grad``) rather than being an optax
transform of a gradient already computed.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from gcgd_jax.transforms import _common


def _global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of ``tree``, accumulated in at least float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(
        sum(jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in leaves)
    )


def gradient_norm_penalty(
    loss_fn: Callable[..., Any],
    radius: Any = 0.1,
    alpha: Any = 0.8,
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    eps: float = 1e-12,
    unperturbed_term: Literal["gradient", "normalized"] = "gradient",
) -> Callable[..., Any]:
    r"""``jax.value_and_grad`` of ``loss_fn`` with the gradient-norm penalty.

    Penalising the gradient norm, :math:`L(\theta) + \lambda \lVert \nabla
    L(\theta) \rVert_2`, has a gradient involving a Hessian-vector product; its
    first-order approximation (finite difference along :math:`\nabla L`) is

    .. math::

        g = (1 - \alpha)\, \nabla L(\theta)
          + \alpha\, \nabla L\Big(\theta + r \frac{\nabla L(\theta)}
                                          {\lVert \nabla L(\theta) \rVert_2 + \epsilon}\Big),
        \qquad \alpha = \lambda / r,

    with the norm taken globally over all differentiated arguments. Two
    gradient evaluations per call. :math:`\alpha = 0` is the plain gradient;
    :math:`\alpha = 1` is exactly the gradient of SAM (Foret et al., 2021). A
    zero gradient gives no perturbation (and no NaN). The paper's recipes:
    ``radius=0.1, alpha=0.8`` (CIFAR), ``radius=0.05, alpha=0.8`` (ImageNet).

    The authors' published code (``gnp/training/training_core.py`` of
    JustNobody0204/gradient-norm-penalty, with its default
    ``config.gnp.norm_perturbations = True``, which its CIFAR script keeps)
    mixes the *normalized* gradient instead:
    :math:`(1 - \alpha)\, \nabla L / \lVert \nabla L \rVert_2 + \alpha\,
    \nabla L(\theta + r \nabla L / \lVert \nabla L \rVert_2)`. That is not the
    gradient of the penalised objective (the two agree only where
    :math:`\lVert \nabla L \rVert_2 = 1`, or at :math:`\alpha = 1`);
    ``unperturbed_term="normalized"`` reproduces it, the default follows the
    paper's formula above.

    Relation to :func:`optax.contrib.sam`: optax's SAM is an optimizer wrapper
    that alternates adversarial and outer steps over successive ``update``
    calls and only covers :math:`\alpha = 1`. This function computes both
    gradients in one call and returns the mixed gradient, which any optax
    optimizer then consumes unchanged.

    With a Flax NNX model, differentiate with respect to the functional
    parameter state and merge inside the loss (``copy=True``: each pass gets
    fresh Variables, and flax 0.12 refuses to mutate the passed-in ones from
    inside ``jax.grad``)::

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, rest, x, y):
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, batch_stats), grads = gradient_norm_penalty(loss_fn, has_aux=True)(
            params, rest, x, y)
        nnx.update(model, batch_stats)
        optimizer.update(model, grads)

    The value and the aux (here the BatchNorm statistics) come from the
    unperturbed pass; the perturbed pass is used for its gradient only, so its
    statistics updates are discarded (as in the official code). Do not close
    over a mutable model in ``loss_fn``: both passes would write to it.

    Args:
        loss_fn: the loss, returning a scalar, or ``(scalar, aux)`` when
            ``has_aux``. Differentiated with respect to ``argnums``.
        radius: the perturbation radius :math:`r \ge 0`. A Python number or a
            scalar array, possibly traced (then unchecked).
        alpha: the mixing weight :math:`\alpha \in [0, 1]`. A Python number or
            a scalar array, possibly traced (then unchecked).
        argnums: as in :func:`jax.value_and_grad`; all of them are perturbed,
            with one global norm.
        has_aux: as in :func:`jax.value_and_grad`.
        eps: :math:`\epsilon > 0`, added to the gradient norm in the
            perturbation.
        unperturbed_term: the :math:`(1 - \alpha)` term: ``"gradient"``
            (:math:`\nabla L(\theta)`, the paper's formula) or ``"normalized"``
            (:math:`\nabla L(\theta) / (\lVert \nabla L(\theta) \rVert_2 + \epsilon)`,
            the official code's default). Static.

    Returns:
        A function with the signature of ``loss_fn`` returning
        ``(value, grads)``, or ``((value, aux), grads)`` when ``has_aux``, with
        ``value`` and ``aux`` at the unperturbed :math:`\theta` and ``grads``
        the mixed gradient :math:`g`, structured and typed like the
        differentiated arguments. It can be jitted.

    Raises:
        ValueError: if ``radius`` is negative, ``alpha`` is outside ``[0, 1]``
            or ``eps`` is not positive.

    Example:
        >>> import jax.numpy as jnp
        >>> from gcgd_jax.gradients.gradient_norm_penalty import gradient_norm_penalty
        >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # gradient w, Hessian identity
        >>> value, g = gradient_norm_penalty(loss, radius=0.1, alpha=0.5)(jnp.array([3.0, 4.0]))
        >>> print(value, g)  # w + alpha * r * w / |w| = [3, 4] + 0.05 * [0.6, 0.8]
        12.5 [3.03 4.04]

    References:
        Zhao, Zhang and Hu, `Penalizing Gradient Norm for Efficiently Improving
        Generalization in Deep Learning <https://arxiv.org/abs/2202.03599>`_,
        ICML 2022

        Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
        Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    _common.check_number("radius", radius, lower=0.0)
    _common.check_number("alpha", alpha, lower=0.0)
    if (_common.concrete_value(alpha) or 0.0) > 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    _common.check_number("eps", eps, lower=0.0, inclusive=False)
    if unperturbed_term not in ("gradient", "normalized"):
        raise ValueError(
            f"`unperturbed_term` must be 'gradient' or 'normalized', got {unperturbed_term!r}."
        )
    value_and_grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=has_aux)
    grad_fn = jax.grad(loss_fn, argnums=argnums, has_aux=has_aux)
    positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def value_and_penalised_grad(*args, **kwargs):
        value, grads = value_and_grad_fn(*args, **kwargs)
        # Per argument, as jax.value_and_grad returns them.
        grads_per_arg = (grads,) if isinstance(argnums, int) else grads
        # A zero gradient gives a zero perturbation: 0 * r / eps.
        norm = _global_norm(grads) + eps
        scale = radius / norm
        perturbed_args = list(args)
        for position, grad in zip(positions, grads_per_arg):
            perturbed_args[position] = jax.tree.map(
                lambda p, g: (p + scale * g).astype(g.dtype), args[position], grad
            )
        perturbed_grads = grad_fn(*perturbed_args, **kwargs)
        if has_aux:
            perturbed_grads, _ = perturbed_grads
        mixed = jax.tree.map(
            lambda g, g_pert: ((1 - alpha) * g + alpha * g_pert).astype(g.dtype),
            grads if unperturbed_term == "gradient" else jax.tree.map(lambda g: g / norm, grads),
            perturbed_grads,
        )
        return value, mixed

    return value_and_penalised_grad
