"""PowerGrad: softmax cross-entropy whose backward pass sharpens or flattens p.

PowerGrad cannot be an optax transform: it changes the gradient with respect
to the logits, inside the loss, so it is a loss function with a custom VJP.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common


@jax.custom_vjp
def _powergrad_ce(logits, labels, alpha):
    del alpha  # Only the backward pass uses it.
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _powergrad_ce_fwd(logits, labels, alpha):
    return _powergrad_ce(logits, labels, alpha), (logits, labels, alpha)


def _powergrad_ce_bwd(residuals, g):
    logits, labels, alpha = residuals
    # Half-precision logits: compute p' in float32, hand back the logits' dtype.
    compute_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(compute_dtype)
    # softmax(alpha * log_softmax(z)) == softmax(alpha * z): log_softmax only
    # shifts each row by a constant. jax.nn.softmax subtracts the row maximum, so
    # p' is formed in log space (p**alpha is never formed) and, at alpha = 1,
    # with the same operations as the ordinary cross-entropy gradient.
    p_alpha = jax.nn.softmax(jnp.asarray(alpha, compute_dtype) * z, axis=-1)
    onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=compute_dtype)
    g = g.astype(compute_dtype)[..., None]
    grad_logits = g * p_alpha - g * onehot
    # Integer labels and the hyperparameter alpha get no gradient.
    return grad_logits.astype(logits.dtype), None, None


_powergrad_ce.defvjp(_powergrad_ce_fwd, _powergrad_ce_bwd)


def powergrad_cross_entropy(logits: jax.Array, labels: jax.Array, alpha: Any) -> jax.Array:
    r"""Softmax cross-entropy with the PowerGrad backward pass.

    The forward value is the ordinary softmax cross-entropy with integer labels,
    per example (the same as
    :func:`optax.softmax_cross_entropy_with_integer_labels`). Only the gradient
    with respect to the logits :math:`z` changes: with :math:`p = \mathrm{softmax}(z)`
    and :math:`q` the one-hot label,

    .. math::

        \frac{\partial \ell}{\partial z} = p' - q, \qquad
        p'_i = \frac{p_i^\alpha}{\sum_j p_j^\alpha}
             = \mathrm{softmax}(\alpha \log \mathrm{softmax}(z))_i,
        \qquad 0 \le \alpha \le 1,

    instead of :math:`p - q`. :math:`\alpha = 1` is the ordinary gradient (the
    same operations, so the same numbers in float32); :math:`\alpha = 0` replaces
    :math:`p` by the uniform distribution. :math:`p'` is computed in log space
    from the logits saved in the forward pass, as
    :math:`\mathrm{softmax}(\alpha z)`, which equals the expression above because
    :math:`\log \mathrm{softmax}(z)` only shifts each row by a constant.

    The paper's values of :math:`\alpha`: 0.25 (ResNet-18), 0.05 (ResNet-50),
    0.3 (SE-ResNet-50, ResNet-101).

    Args:
        logits: float array of shape ``[..., num_classes]``, classes on the last
            axis. Half precision is kept: bfloat16 logits get bfloat16 gradients
            (computed in float32 internally).
        labels: integer array of shape ``logits.shape[:-1]``. Gets no gradient.
        alpha: the PowerGrad exponent, a scalar in ``[0, 1]``; a Python number or
            a (possibly traced) scalar array, so it may be scheduled or passed
            through ``jax.jit``. Concrete values are checked; traced ones cannot be.
            It gets no gradient.

    Returns:
        The per-example loss, shape ``logits.shape[:-1]``, dtype of ``logits``.

    Raises:
        ValueError: if ``logits`` is not a floating array with a class axis,
            ``labels`` is not an integer array of shape ``logits.shape[:-1]``, or
            ``alpha`` is not a scalar in ``[0, 1]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gcgd_jax.losses.powergrad import powergrad_cross_entropy
        >>> logits = jnp.array([[2.0, 0.0, -1.0]])
        >>> labels = jnp.array([0])
        >>> loss = lambda z, a: powergrad_cross_entropy(z, labels, a).mean()
        >>> with jnp.printoptions(precision=4, suppress=True):
        ...     print(jax.grad(loss)(logits, 1.0))  # ordinary: p - q
        ...     print(jax.grad(loss)(logits, 0.0))  # uniform - q
        [[-0.1562  0.1142  0.042 ]]
        [[-0.6667  0.3333  0.3333]]

    References:
        Das et al., `Altering Backward Pass Gradients improves Convergence
        <https://arxiv.org/abs/2111.12495>`_, 2021
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(
            "`logits` must be a floating array with classes on the last axis; got "
            f"dtype {logits.dtype}, shape {logits.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"`labels` must be an integer array; got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape logits.shape[:-1] = {logits.shape[:-1]}; got {labels.shape}."
        )
    if jnp.ndim(alpha) != 0:
        raise ValueError(f"`alpha` must be a scalar; got shape {jnp.shape(alpha)}.")
    _common.check_number("alpha", alpha, lower=0.0)
    if (_common.concrete_value(alpha) or 0.0) > 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
    return _powergrad_ce(logits, labels, alpha)
