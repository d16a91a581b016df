"""MARS-approx: the variance-reduction correction of MARS as a standalone transform."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common

__all__ = ["MarsCorrectionState", "mars_correction"]


class MarsCorrectionState(NamedTuple):
    """State of :func:`mars_correction`."""

    count: jax.Array  # () int32: updates seen (0 before the first one).
    prev_grad: Any  # params-shaped tree, float32 (at least): g_{t-1}, the last raw gradient.


def mars_correction(
    gamma: float = 0.025,
    beta1: float = 0.95,
    max_norm: float | None = 1.0,
    *,
    initial_prev_grad: Literal["first_grad", "zeros"] = "first_grad",
) -> optax.GradientTransformation:
    r"""MARS-approx gradient correction: a scaled gradient difference added back.

    For every float leaf, with :math:`g_t` this step's raw gradient and
    :math:`g_{t-1}` the previous step's (another minibatch: the "approx"
    variant, which needs no second gradient evaluation),

    .. math::

      c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}),
      \qquad c_t \leftarrow c_t \cdot \min\!\Big(1, \frac{\tau}{\|c_t\|}\Big)

    per tensor (``τ = max_norm``; ``None`` switches the clipping off). The
    first step has no previous gradient. By default (``initial_prev_grad=
    "first_grad"``) its difference is 0 (``c_1 = g_1``, then clipped). The
    official code (and pytorch-optimizer) start the previous gradient at zero
    instead, so there :math:`c_1 = (1 + \gamma\beta_1/(1-\beta_1))\,g_1`
    before the clip: ``initial_prev_grad="zeros"`` reproduces that (with the
    paper's defaults the first correction is 1.475 times the gradient until the
    clip bounds it). The optimizer chained after it (MARS uses AdamW) runs its
    moments on :math:`c_t`.

    Paper defaults (its AdamW form): ``gamma = 0.025``, ``beta1 = 0.95`` (the
    coefficient :math:`\gamma\beta_1/(1-\beta_1)` is then 0.475) and clipping
    at norm 1 per parameter tensor, as in the official code. That code
    applies the correction to 2-D weights only (1-D parameters get plain
    AdamW); here every float leaf is corrected, so reproduce that with
    :func:`optax.masked`. Non-float leaves pass through untouched. Numbers are
    computed in at least float32; updates keep the gradient's dtype.

    Args:
      gamma: scale of the variance-reduction term, ``>= 0`` (``0``: only the
        clipping remains).
      beta1: the momentum :math:`\beta_1` that sets the coefficient, in
        ``[0, 1)``.
      max_norm: per-tensor norm bound τ on :math:`c_t` (``> 0``), or ``None``.
      initial_prev_grad: :math:`g_0`, the previous gradient of the first step:
        ``"first_grad"`` (:math:`g_0 = g_1`, no correction on the first step) or
        ``"zeros"`` (:math:`g_0 = 0`, as in the official code). A string, so
        ``optax.inject_hyperparams`` leaves it static.

    Returns:
      An :class:`optax.GradientTransformation` with a
      :class:`MarsCorrectionState`. ``gamma``, ``beta1`` and a numeric
      ``max_norm`` may be injected with :func:`optax.inject_hyperparams`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gcgd_jax.transforms.mars_correction import mars_correction
      >>> tx = mars_correction(gamma=0.1, beta1=0.5, max_norm=None)
      >>> state = tx.init(jnp.zeros(2))
      >>> c, state = tx.update(jnp.array([1.0, 2.0]), state)  # first step: c = g
      >>> c, state = tx.update(jnp.array([2.0, 2.0]), state)
      >>> c.tolist()  # g + 0.1 * 0.5 / 0.5 * (g - g_prev)
      [2.0999999046325684, 2.0]

    References:
      Yuan et al, `MARS: Unleashing the Power of Variance Reduction for Training
      Large Models <https://arxiv.org/abs/2411.10438>`_, 2024
    """
    _common.check_number("gamma", gamma, lower=0.0)
    _common.check_number("beta1", beta1, lower=0.0)
    b = _common.concrete_value(beta1)
    if b is not None and not b < 1.0:
        raise ValueError(f"`beta1` must be in [0, 1), got {beta1!r}.")
    if max_norm is not None:
        _common.check_number("max_norm", max_norm, lower=0.0, inclusive=False)
    if initial_prev_grad not in ("first_grad", "zeros"):
        raise ValueError(
            f"`initial_prev_grad` must be 'first_grad' or 'zeros', got {initial_prev_grad!r}."
        )

    def init_fn(params):
        return MarsCorrectionState(
            count=jnp.zeros([], jnp.int32), prev_grad=_common.acc_zeros_like(params)
        )

    def update_fn(updates, state, params=None):
        del params
        coef = gamma * beta1 / (1.0 - beta1)
        first = state.count == 0

        def correct(g, prev):
            if not _common.is_float(g):
                return g, prev
            g32 = jnp.asarray(g).astype(prev.dtype)  # in the state's (>= float32) dtype
            if initial_prev_grad == "zeros":  # prev starts at zeros (init_fn)
                c = g32 + coef * (g32 - prev)
            else:
                c = g32 + coef * jnp.where(first, 0.0, g32 - prev)
            if max_norm is not None:
                norm = optax.tree.norm(c)  # of this tensor (c is >= float32)
                c = c * jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
            return c.astype(g.dtype), g32

        leaves, treedef = jax.tree.flatten(updates)
        pairs = [
            correct(g, prev) for g, prev in zip(leaves, treedef.flatten_up_to(state.prev_grad))
        ]
        new_updates = jax.tree.unflatten(treedef, [c for c, _ in pairs])
        prev = jax.tree.unflatten(treedef, [p for _, p in pairs])
        return new_updates, MarsCorrectionState(optax.safe_increment(state.count), prev)

    return optax.GradientTransformation(init_fn, update_fn)
