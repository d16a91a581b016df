"""Grokfast-EMA: amplify the slow (low-pass filtered) part of the gradient."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common

__all__ = ["GrokfastEMAState", "grokfast_ema"]


class GrokfastEMAState(NamedTuple):
    """State of :func:`grokfast_ema`."""

    count: jax.Array  # () int32: updates seen (0 before the first one).
    ema: Any  # params-shaped tree, float32 (at least): h_t, the low-pass filtered gradient.


def grokfast_ema(alpha: float = 0.98, lamb: float = 2.0) -> optax.GradientTransformation:
    r"""Grokfast-EMA: adds an amplified exponential moving average of the gradient.

    For every float leaf with raw gradient :math:`g_t`,

    .. math::

      h_1 = g_1, \qquad h_t = \alpha\,h_{t-1} + (1-\alpha)\,g_t, \qquad
      \hat g_t = g_t + \lambda\,h_t .

    :math:`h` is a low-pass filter of the gradient sequence; adding it back
    amplifies the slowly varying component (the authors' account of
    accelerated grokking). The filter starts at the first gradient
    (:math:`h_1 = g_1`, so :math:`\hat g_1 = (1+\lambda) g_1`), as in the
    official code (``gradfilter_ema``); the paper's algorithm box is
    equivalent up to that first value. Defaults are the paper's:
    ``alpha = 0.98``, ``lamb = 2.0``. Every float leaf is filtered (as in the
    official code, which filters every parameter); non-float leaves pass
    through. Numbers are computed in at least float32; updates keep the
    gradient's dtype.

    Args:
      alpha: EMA decay :math:`\alpha`, in ``[0, 1)``.
      lamb: amplification :math:`\lambda`, ``>= 0`` (``0``: the identity).

    Returns:
      An :class:`optax.GradientTransformation` with a :class:`GrokfastEMAState`;
      ``alpha`` and ``lamb`` may be injected with :func:`optax.inject_hyperparams`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gcgd_jax.transforms.grokfast_ema import grokfast_ema
      >>> tx = grokfast_ema(alpha=0.5, lamb=2.0)
      >>> state = tx.init(jnp.zeros(1))
      >>> g, state = tx.update(jnp.array([1.0]), state)  # h = 1: g + 2 h
      >>> g.tolist()
      [3.0]
      >>> g, state = tx.update(jnp.array([3.0]), state)  # h = 0.5 + 1.5 = 2
      >>> g.tolist()
      [7.0]

    References:
      Lee et al, `Grokfast: Accelerated Grokking by Amplifying Slow Gradients
      <https://arxiv.org/abs/2405.20233>`_, 2024
    """
    _common.check_number("alpha", alpha, lower=0.0)
    a = _common.concrete_value(alpha)
    if a is not None and not a < 1.0:
        raise ValueError(f"`alpha` must be in [0, 1), got {alpha!r}.")
    _common.check_number("lamb", lamb, lower=0.0)

    def init_fn(params):
        return GrokfastEMAState(count=jnp.zeros([], jnp.int32), ema=_common.acc_zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0

        def filt(g, h):
            if not _common.is_float(g):
                return g, h
            g32 = jnp.asarray(g).astype(h.dtype)  # in the state's (>= float32) dtype
            # Not optax.tree.update_moment ((1-α)g + αh): under jit XLA may contract the
            # sum into an FMA, whose rounding depends on the operand order (measured on
            # GC-W's EMA), so the existing order is kept.
            h = jnp.where(first, g32, alpha * h + (1.0 - alpha) * g32)
            return (g32 + lamb * h).astype(g.dtype), h

        leaves, treedef = jax.tree.flatten(updates)
        pairs = [filt(g, h) for g, h in zip(leaves, treedef.flatten_up_to(state.ema))]
        new_updates = jax.tree.unflatten(treedef, [u for u, _ in pairs])
        ema = jax.tree.unflatten(treedef, [h for _, h in pairs])
        return new_updates, GrokfastEMAState(optax.safe_increment(state.count), ema)

    return optax.GradientTransformation(init_fn, update_fn)
