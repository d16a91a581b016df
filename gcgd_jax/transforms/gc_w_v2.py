"""GC-W v2: a per-coordinate attention filter over the gradient's history (our design).

Version 1 (:func:`gcgd_jax.transforms.gc_w.gc_w`) attends across the output
units of a kernel with a predictor of ``O(n·d)`` weights trained once per
window; measured, it is nearly a no-op. Version 2 keeps the GCGD idea (an
attention-like structure predicts a gradient offset ``ΔG``, trained
asynchronously from what later gradients reveal) but attends across *time
scales* of each coordinate's own history, shares its ``O(T·d)`` weights across
the coordinates (every step gives it ``n`` samples per kernel), trains every
step, and maximises the first-order loss decrease instead of a similarity.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gcgd_jax.transforms._common import check_number, memory_parts
from gcgd_jax.transforms.gc_w import static_int

__all__ = [
    "GCWv2Predictor",
    "GCWv2State",
    "gc_w_v2",
    "gc_w_v2_effective_filter",
    "gc_w_v2_features",
    "gc_w_v2_memory_floats",
    "gc_w_v2_objective",
    "gc_w_v2_offset",
    "gc_w_v2_states",
]

_TINY = 1e-30


class GCWv2Predictor(NamedTuple):
    """Parameters of one kernel's predictor (float32); ``T`` tokens, ``h`` heads of size ``d``.

    In :class:`GCWv2State` each field is a tree with the parameters' structure
    (one predictor per kernel; ``optax.MaskedNode`` at non-kernel leaves).
    """

    w_q: Any  # (h, d, T) query projection of the coordinate's current feature vector.
    b_q: Any  # (h, d) query bias.
    u_k: Any  # (h, d) key direction, scaled by the token's value.
    e_k: Any  # (h, T, d) key embedding of each token (its time scale).
    w_v: Any  # (h, T) value weight of each token; zero at init.
    a: Any  # (T,) direct linear filter over the tokens; zero at init.


class GCWv2State(NamedTuple):
    """State of :func:`gc_w_v2`. Per-kernel buffers are float32; non-kernel leaves hold
    ``optax.MaskedNode()``. ``K`` decays, ``T = K + 2`` tokens, horizon ``k``, ``n`` = size.

    The features of the last step are not stored: they are rebuilt from
    ``prev_grad``, ``emas``, ``prev_diff`` and ``prev_scale`` (the same float32
    values, so the same features bit for bit). Only a horizon ``k > 1`` keeps
    older ones, in ``ring``. :attr:`stored` and :attr:`stored_scale` give all
    ``k`` as one ring, slot ``t mod k`` for step ``t``.
    """

    count: jax.Array  # () int32: steps taken with finite gradients.
    emas: Any  # (K, *shape): m_β = β m_β + (1-β) G per decay, started at the first gradient.
    prev_grad: Any  # (*shape): G_{t-1} (G_0 before the second step).
    prev_diff: Any  # (*shape): G_{t-1} - G_{t-2}, the last difference token (raw).
    prev_scale: Any  # (): s_{t-1}, the last features' normalisation (0 before the first step).
    ring: Any  # (k-1, T, n): normalised features of steps t-k .. t-2 (slot j mod (k-1)
    #   for step j); optax.MaskedNode() everywhere when k = 1.
    ring_scale: Any  # (k-1,): their normalisation s (0 where a slot is still empty).
    predictor: GCWv2Predictor  # the predictor's parameters.
    predictor_opt_state: Any  # optax.adam state of the predictor.
    objective: jax.Array  # () float32: mean over kernels of the last training objective J.
    predictor_steps: jax.Array  # () int32: predictor optimiser steps taken.

    @property
    def stored(self) -> Any:
        """``(k, T, n)`` per kernel: normalised features of the last ``k`` steps, slot
        ``j mod k`` for step ``j`` (zeros for steps before the first)."""
        return self._stored()[0]

    @property
    def stored_scale(self) -> Any:
        """``(k,)`` per kernel: the normalisation ``s`` of :attr:`stored`'s slots."""
        return self._stored()[1]

    def _stored(self) -> tuple[Any, Any]:
        leaves, treedef = jax.tree_util.tree_flatten(self.emas)
        flat = treedef.flatten_up_to
        xs, ss = [], []
        for emas, prev, diff, scale, ring, ring_scale in zip(
            leaves,
            flat(self.prev_grad),
            flat(self.prev_diff),
            flat(self.prev_scale),
            flat(self.ring),
            flat(self.ring_scale),
        ):
            x_last = _rebuilt(prev, emas, diff, scale)
            if isinstance(ring, optax.MaskedNode):
                xs.append(x_last[None])
                ss.append(scale[None])
            else:
                xs.append(_by_step(ring, x_last, self.count))
                ss.append(_by_step(ring_scale, scale, self.count))
        return jax.tree_util.tree_unflatten(treedef, xs), jax.tree_util.tree_unflatten(treedef, ss)


def _is_kernel(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(jnp.shape(x)) >= 2


def _raw(g: jax.Array, emas: jax.Array, diff: jax.Array) -> jax.Array:
    """``(T, n)`` raw tokens ``[G, m_{β_1}, …, m_{β_K}, G - G_{t-1}]``."""
    return jnp.concatenate(
        [g.reshape(1, -1), emas.reshape(emas.shape[0], -1), diff.reshape(1, -1)], axis=0
    )


def _inverse(s: jax.Array) -> jax.Array:
    return 1.0 / jnp.where(s > 0, s, 1.0)


def _normalised(raw: jax.Array, s: jax.Array) -> jax.Array:
    """``raw / s`` as ``raw · (1/s)`` (what XLA's CPU backend computes for a division
    by a scalar anyway), written out so :func:`_rebuilt` gets the same bits."""
    return raw * _inverse(s)


def _rebuilt(prev: jax.Array, emas: jax.Array, diff: jax.Array, s: jax.Array) -> jax.Array:
    """The last step's normalised features from its raw tokens and ``s``: the same
    products as :func:`_normalised` (so the same bits), taken before the
    concatenation (one pass over the state instead of two)."""
    r = _inverse(s)
    return _raw(prev * r, emas * r, diff * r)


def _rms(raw: jax.Array) -> jax.Array:
    a = jnp.max(jnp.abs(raw))
    a_safe = jnp.where(a > 0, a, 1.0)
    return a * jnp.sqrt(jnp.mean(jnp.square(raw / a_safe)))  # rms without overflow


def _by_step(ring: jax.Array, last: jax.Array, count: jax.Array) -> jax.Array:
    """Steps ``t-k .. t-1`` as a ``k``-slot ring (slot ``j mod k``) from ``ring``
    (steps ``t-k .. t-2``, slot ``j mod (k-1)``) and ``last`` (step ``t-1``)."""
    k = ring.shape[0] + 1
    lag = jnp.mod(count - 1 - jnp.arange(k), k)  # slot r holds step t-1-lag_r
    older = jnp.take(ring, jnp.mod(count - 1 - lag, k - 1), axis=0)
    return jnp.where((lag == 0).reshape((k,) + (1,) * last.ndim), last[None], older)


def gc_w_v2_features(g: jax.Array, emas: jax.Array, prev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalised token features of one kernel: ``(x, s)``.

    ``x`` is ``(T, n)``: rows ``[G, m_{β_1}, …, m_{β_K}, G - G_{t-1}] / s`` with
    ``s`` the RMS of all ``T·n`` raw entries (``x = 0`` where ``s = 0``).
    """
    raw = _raw(g, emas, g - prev)
    s = _rms(raw)
    return _normalised(raw, s), s


def _bounded(dx: jax.Array, x0: jax.Array, rho) -> jax.Array:
    """``dx · min(1, ρ‖x0‖/‖dx‖)`` with a finite gradient at ``dx = 0``; 0 if not finite."""
    bound = rho * jnp.sqrt(jnp.sum(jnp.square(x0)))
    nd_sq = jnp.sum(jnp.square(dx))
    big = (nd_sq > jnp.square(bound)) | (bound <= 0)
    scale = jnp.where(big, bound / jnp.sqrt(jnp.where(nd_sq > 0, nd_sq, 1.0)), 1.0)
    dx = dx * jnp.where(bound > 0, scale, 0.0)
    return jnp.where(jnp.all(jnp.isfinite(dx)), dx, 0.0)


def _precontract(p: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The query folded into the keys: ``(M, c)`` with ``[q·u; q·e_j] = M x + c`` per head.

    ``q·u = (u W_q) x + u·b_q`` and ``q·e_j = (e_j W_q) x + e_j·b_q``, so the
    ``(h, d, n)`` queries are never formed: ``M`` is ``(h (T+1), T)``, rows
    ``[u W_q, e_1 W_q, …, e_T W_q]`` per head, ``c`` the matching biases.
    """
    w_q, b_q, u, e = p["w_q"], p["b_q"], p["u_k"], p["e_k"]
    h, _, t = w_q.shape
    m = jnp.concatenate(
        [jnp.einsum("hd,hdt->ht", u, w_q)[:, None], jnp.einsum("hjd,hdt->hjt", e, w_q)], axis=1
    )
    c = jnp.concatenate(
        [jnp.einsum("hd,hd->h", u, b_q)[:, None], jnp.einsum("hjd,hd->hj", e, b_q)], axis=1
    )
    return m.reshape(h * (t + 1), t), c.reshape(h * (t + 1))


def _sum(terms: Sequence[jax.Array]) -> jax.Array:
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _attention_rows(m, c, w_v, a, x, inv):
    """Forward pass of :func:`_attention` on ``(n,)`` rows: ``(ΔX, attn, qu)``.

    The softmax over the ``T`` tokens is a max, sum and product of rows: as
    ``(h, T, n)`` reductions over the token axis XLA's CPU backend ran 15x
    slower (a reduction over a short, non-minor axis).
    """
    h, t = w_v.shape
    y = m @ x + c[:, None]  # (h (T+1), n): q·u, then q·e_j, per head
    rows = [x[j] for j in range(t)]
    out = a @ x
    attn, qu = [], []
    for i in range(h):
        qu_i = y[i * (t + 1)]
        logits = [(rows[j] * qu_i + y[i * (t + 1) + 1 + j]) * inv for j in range(t)]
        top = logits[0]
        for logit in logits[1:]:
            top = jnp.maximum(top, logit)
        ex = [jnp.exp(logit - top) for logit in logits]
        den = _sum(ex)
        attn_i = [e / den for e in ex]
        out = out + _sum([attn_i[j] * (w_v[i, j] * rows[j]) for j in range(t)])
        attn.append(jnp.stack(attn_i))
        qu.append(qu_i)
    return out, jnp.stack(attn), jnp.stack(qu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(m, c, w_v, a, x, inv):
    """``ΔX = Σ_h Σ_j softmax_j(logits_h)_j w_hj x_j + a·x`` with
    ``logits_hj = (x_j (M_h0 x + c_h0) + M_hj x + c_hj) · inv``.

    A hand-written reverse pass (reusing the forward's attention weights):
    about half the time of the one ``jax.grad`` derives on XLA's CPU backend.
    Reverse mode only (no ``jax.jvp``).
    """
    return _attention_rows(m, c, w_v, a, x, inv)[0]


def _attention_fwd(m, c, w_v, a, x, inv):
    out, attn, qu = _attention_rows(m, c, w_v, a, x, inv)
    return out, (m, w_v, a, x, attn, qu)


def _attention_bwd(inv, res, g):
    m, w_v, a, x, attn, qu = res
    h, t = w_v.shape
    rows = [x[j] for j in range(t)]
    dy, dx_rows = [], [a[j] * g for j in range(t)]
    for i in range(h):
        v = [w_v[i, j] * rows[j] for j in range(t)]
        at = [attn[i, j] for j in range(t)]
        vbar = _sum([at[j] * v[j] for j in range(t)])  # this head's output
        dl = [g * at[j] * (v[j] - vbar) * inv for j in range(t)]  # d logit_ij · inv
        dy.append(_sum([dl[j] * rows[j] for j in range(t)]))
        dy.extend(dl)
        for j in range(t):
            dx_rows[j] = dx_rows[j] + g * at[j] * w_v[i, j] + dl[j] * qu[i]
    dy = jnp.stack(dy)  # (h (T+1), n)
    z = jnp.concatenate([x[None], attn * x[None]], axis=0).reshape(-1, x.shape[1]) @ g
    dx = jnp.stack(dx_rows) + m.T @ dy
    return dy @ x.T, jnp.sum(dy, axis=1), z[t:].reshape(h, t), z[:t], dx


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attend(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The unbounded offset ``ΔX`` ``(n,)`` (see :func:`gc_w_v2_offset`)."""
    m, c = _precontract(p)
    return _attention(m, c, p["w_v"], p["a"], x, 1.0 / math.sqrt(p["w_q"].shape[1]))


def gc_w_v2_offset(
    p: dict[str, jax.Array] | GCWv2Predictor, x: jax.Array, rho: float | jax.Array
) -> jax.Array:
    """Bounded offset ``ΔX`` ``(n,)`` of one kernel for features ``x`` ``(T, n)``.

    ``ΔG = s · ΔX`` (see :func:`gc_w_v2`). ``p`` maps the
    :class:`GCWv2Predictor` field names to one kernel's arrays.
    """
    if isinstance(p, GCWv2Predictor):
        p = p._asdict()
    return _bounded(_attend(p, x), x[0], rho)


def gc_w_v2_objective(
    p: dict[str, jax.Array] | GCWv2Predictor,
    x: jax.Array,
    target: jax.Array,
    rho: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``J = ⟨ΔX, Ḡ⟩ / (‖X_G‖ ‖Ḡ‖)`` for stored features ``x`` and a raw target ``Ḡ`` (flat).

    Equals ``⟨ΔG, Ḡ⟩ / (‖G‖ ‖Ḡ‖)``; returns ``(J, valid)`` (``J = 0`` where
    ``‖X_G‖ = 0`` or ``‖Ḡ‖ = 0``).
    """
    dx = gc_w_v2_offset(p, x, rho)
    tn = jax.lax.stop_gradient(target)
    scale = jnp.max(jnp.abs(tn))
    tn = tn / jnp.where(scale > 0, scale, 1.0)
    x_norm = jnp.sqrt(jnp.sum(jnp.square(x[0])))
    t_norm = jnp.sqrt(jnp.sum(jnp.square(tn)))
    valid = (x_norm > _TINY) & (t_norm > _TINY) & jnp.isfinite(t_norm)
    den = jnp.where(valid, x_norm * t_norm, 1.0)
    return jnp.where(valid, jnp.sum(dx * tn) / den, 0.0), valid


def _check_decays(decays: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(b) for b in decays)
    except TypeError:
        raise ValueError(
            f"`decays` must be a sequence of numbers in [0, 1), got {decays!r}."
        ) from None
    if not out or not all(0.0 <= b < 1.0 for b in out):
        raise ValueError(
            f"`decays` must be a non-empty sequence of numbers in [0, 1), got {decays!r}."
        )
    return out


def gc_w_v2(
    rho: float = 1.0,
    decays: Sequence[float] = (0.5, 0.9, 0.99),
    horizon: int = 1,
    num_heads: int = 2,
    head_size: int = 8,
    predictor_learning_rate: float = 1e-2,
    warmup: int = 0,
    key: int | jax.Array = 0,
) -> optax.GradientTransformation:
    r"""GC-W v2: a learned, bounded offset from each coordinate's gradient history.

    For every kernel leaf (float, ``ndim >= 2``) with gradient :math:`G_t` of
    ``n`` entries, GC-W v2 keeps EMAs at the decays :math:`\beta_1..\beta_K`
    (started at the first gradient: :math:`m_{\beta,0} = G_0`,
    :math:`m_{\beta,t} = \beta m_{\beta,t-1} + (1-\beta) G_t`) and the previous
    gradient, and builds ``T = K + 2`` tokens per coordinate ``i``:

    .. math::

      x_i = \big[G_{t,i},\ m_{\beta_1,t,i},\ \dots,\ m_{\beta_K,t,i},\
        G_{t,i} - G_{t-1,i}\big] / s, \qquad
      s = \mathrm{rms}(\text{all } T n \text{ raw entries})

    (``G_{-1} = G_0``). The tokens are the coordinate's history at several
    time scales. A small attention, with weights shared by all coordinates of
    the kernel, reads them: per head ``h`` (size ``d``) the query comes from
    the current feature vector and the keys/values from the history tokens,

    .. math::

      & q_i = W_q x_i + b_q, \quad k_{ij} = x_{ij} u + e_j, \quad v_{ij} = w_j x_{ij}, \\
      & \Delta X_i = \sum_h \sum_j \mathrm{softmax}_j\!\Big(\frac{q_i\cdot k_{ij}}
        {\sqrt d}\Big) v_{ij} + \sum_j a_j x_{ij},

    then :math:`\Delta X \leftarrow \Delta X \min(1, \rho\|x_{\cdot,0}\|/\|\Delta X\|)`
    (i.e. :math:`\|\Delta G\| \le \rho \|G\|` per tensor) and
    :math:`\hat G_t = G_t + s\,\Delta X`. ``w`` and ``a`` start at zero, so the
    transform starts as the identity; :math:`W_q, u, e` start random
    (``key``). The predictor has :math:`h(2Td + 2d + T) + T` weights per
    kernel, whatever ``n``.

    **Known corrections are in its hypothesis class exactly** (the linear
    filter ``a``, or uniform attention with :math:`W_q = b_q = 0`, ``w = T a``):
    MARS-approx's :math:`\gamma\frac{\beta}{1-\beta}(G_t - G_{t-1})`
    (``a`` on the difference token) and Grokfast-EMA's :math:`\lambda
    \mathrm{EMA}_\alpha(G)` (``a = λ`` on the token of decay ``α``, with
    ``α`` in ``decays``), for ``ρ`` above their norm ratio; tested to 1e-5.

    **Objective and asynchronous training.** With the update :math:`-\eta\hat G_t`
    the first-order loss change is :math:`-\eta\langle\hat G_t, G_{t+1}\rangle`;
    so the predictor maximises, per kernel,

    .. math::

      J = \frac{\langle \Delta G_t, \bar G\rangle}{\|G_t\|\,\|\bar G\|}, \qquad
      \bar G = \frac1k \sum_{j=1}^{k} G_{t+j}

    (``k = horizon``; no shrinkage term; summed over kernels). The features
    of the last ``k`` steps are kept (the latest rebuilt from the EMAs, the
    previous gradient and its difference token, bit for bit; older ones
    stored); at step ``t`` (``t >= k``) one Adam
    step (``predictor_learning_rate``) on ``-ΣJ`` uses the input of
    step ``t-k`` and the target :math:`\bar G` made of the gradients
    ``t-k+1 .. t`` (strictly after the input: no target leak); then this
    step's offset is computed with the updated predictor. No extra
    forward/backward pass of the network. During the first ``warmup`` steps
    the predictor trains but is not applied.

    **Status.** Measured in the *GC-W study* results pages with every
    method's learning rate tuned on separate seeds: on open-loop gradient
    streams it moves the gradient much closer to the true one (it learns a
    near-optimal smoothing filter), but chained before a tuned Adam on noisy
    quadratic and regression problems it reaches a loss threshold later and
    ends higher than Adam alone (the objective rewards predicting the next
    gradient, noise included, and has no step-size term). So it is not the
    default: ``gc_w`` is still version 1, and v2 is opt-in.

    **Leaves.** Non-kernel leaves (``ndim < 2``: biases, BatchNorm
    parameters; non-float leaves) pass through unchanged and hold no state, so
    ``optax.chain(gc_w_v2(), opt)`` works on a whole model; select particular
    kernels (the pre-down-sampling ones) with :func:`optax.masked`.

    **Non-finite gradients.** If any kernel gradient is not finite the
    gradients pass unchanged (an outer :func:`optax.apply_if_finite` then
    skips the step) and the state is returned unchanged. A finite gradient
    whose correction would overflow its leaf's dtype (within ``ρ`` of the
    largest finite value, most likely in float16) passes unchanged in that
    leaf; the state still advances.

    **Memory** (float32 words, ``N`` selected kernel entries):
    ``(K + 2 + (k - 1) T) N + k`` per kernel set of buffers (EMAs, previous
    gradient, previous difference token, ``k - 1`` stored feature sets and
    ``k`` scales) plus ``3 (h(2Td + 2d + T) + T)`` per kernel for the
    predictor and its Adam state (:func:`gc_w_v2_memory_floats`). Defaults
    (``K = 3, k = 1``): 5 words per selected parameter.

    **Cost.** The offset is computed per token row (``(n,)`` arrays) with the
    query folded into the keys (``q·u = (u W_q) x + u·b_q``, likewise
    ``q·e_j``: no ``(h, d, n)`` queries) and a hand-written reverse pass;
    the same formula as above to float32 rounding (sums in another order).

    **Dtypes.** Computed in float32; updates keep the gradient's dtype; state
    dtypes never change. No ``jax.jit`` inside: jit the train step.

    Args:
      rho: bound, ``||ΔG|| <= rho ||G||`` per tensor (``>= 0``; values ``>= 1``
        are allowed: amplifying an EMA needs them).
      decays: EMA decays (static; each in ``[0, 1)``).
      horizon: ``k``, gradients averaged into the target (static int ``>= 1``).
      num_heads: attention heads (static int ``>= 1``).
      head_size: head size ``d`` (static int ``>= 1``).
      predictor_learning_rate: Adam learning rate of the predictor (``>= 0``).
      warmup: steps during which the predictor trains but is not applied
        (``>= 0``).
      key: int seed or PRNG key for the random initial weights.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`GCWv2State`; ``state.objective`` is the last mean ``J``. With
      ``optax.inject_hyperparams`` pass ``static_args=("decays", "horizon",
      "num_heads", "head_size", "key")``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gcgd_jax.transforms.gc_w_v2 import gc_w_v2
      >>> params = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
      >>> tx = optax.chain(gc_w_v2(), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.ones(4)}
      >>> updates, state = tx.update(grads, state, params)
      >>> bool(jnp.allclose(updates["kernel"], -0.05))  # identity at the start
      True
      >>> bool(jnp.allclose(updates["bias"], -0.1))  # a bias passes through
      True

    References:
      Li et al, `Gradient Correction beyond Gradient Descent
      <https://arxiv.org/abs/2203.08345>`_, 2022 (withdrawn; this design is ours).
      Yuan et al, `MARS <https://arxiv.org/abs/2411.10438>`_, 2024; Lee et al,
      `Grokfast <https://arxiv.org/abs/2405.20233>`_, 2024 (the corrections its
      hypothesis class contains).
    """
    check_number("rho", rho, lower=0.0)
    decays = _check_decays(decays)
    horizon = static_int("horizon", horizon, 1)
    num_heads = static_int("num_heads", num_heads, 1)
    head_size = static_int("head_size", head_size, 1)
    check_number("predictor_learning_rate", predictor_learning_rate, lower=0.0)
    check_number("warmup", warmup, lower=0.0)
    if isinstance(key, (bool, np.bool_)):
        raise ValueError(f"`key` must be an int seed or a PRNG key, got {key!r}.")
    n_tok = len(decays) + 2
    h, d, k = num_heads, head_size, horizon
    decay_arr = np.asarray(decays, np.float32)
    predictor_tx = optax.adam(predictor_learning_rate)

    def make_key():
        if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if isinstance(key, (jax.Array, np.ndarray)) and key.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
        try:
            return jax.random.key(key)
        except (TypeError, ValueError):
            raise ValueError(f"`key` must be an int seed or a PRNG key, got {key!r}.") from None

    def init_fn(params):
        root = make_key()
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        fields = {name: [] for name in GCWv2Predictor._fields}
        bufs = {
            name: []
            for name in ("emas", "prev_grad", "prev_diff", "prev_scale", "ring", "ring_scale")
        }
        for path, leaf in leaves_with_path:
            if not _is_kernel(leaf):
                for v in (*fields.values(), *bufs.values()):
                    v.append(optax.MaskedNode())
                continue
            shape, n = tuple(jnp.shape(leaf)), math.prod(jnp.shape(leaf))
            # The key depends on the leaf's path only (same predictor whatever is masked).
            path_id = zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF
            kq, ku, ke = jax.random.split(jax.random.fold_in(root, path_id), 3)
            fields["w_q"].append(jax.random.normal(kq, (h, d, n_tok)) / math.sqrt(n_tok))
            fields["b_q"].append(jnp.zeros((h, d), jnp.float32))
            fields["u_k"].append(jax.random.normal(ku, (h, d)))
            fields["e_k"].append(jax.random.normal(ke, (h, n_tok, d)))
            fields["w_v"].append(jnp.zeros((h, n_tok), jnp.float32))
            fields["a"].append(jnp.zeros((n_tok,), jnp.float32))
            bufs["emas"].append(jnp.zeros((len(decays), *shape), jnp.float32))
            bufs["prev_grad"].append(jnp.zeros(shape, jnp.float32))
            bufs["prev_diff"].append(jnp.zeros(shape, jnp.float32))
            bufs["prev_scale"].append(jnp.zeros([], jnp.float32))
            # No zero-size arrays at k = 1 (orbax refuses to save them).
            bufs["ring"].append(
                jnp.zeros((k - 1, n_tok, n), jnp.float32) if k > 1 else optax.MaskedNode()
            )
            bufs["ring_scale"].append(
                jnp.zeros((k - 1,), jnp.float32) if k > 1 else optax.MaskedNode()
            )
        unflat = lambda v: jax.tree_util.tree_unflatten(treedef, v)
        predictor = GCWv2Predictor(**{f: unflat(v) for f, v in fields.items()})
        return GCWv2State(
            count=jnp.zeros([], jnp.int32),
            **{f: unflat(v) for f, v in bufs.items()},
            predictor=predictor,
            predictor_opt_state=predictor_tx.init(predictor),
            objective=jnp.zeros([], jnp.float32),
            predictor_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        flat = treedef.flatten_up_to
        sel = [i for i, g in enumerate(leaves) if _is_kernel(g)]
        if not sel:
            return updates, state
        count = state.count
        g32 = {i: leaves[i].astype(jnp.float32) for i in sel}
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g32[i])) for i in sel]))
        first = count == 0
        emas_old, prev_old = flat(state.emas), flat(state.prev_grad)
        diff_old, pscale_old = flat(state.prev_diff), flat(state.prev_scale)
        ring_old, rscale_old = flat(state.ring), flat(state.ring_scale)
        ready = count >= k
        emas, diff, feats, lasts, inputs, targets = {}, {}, {}, {}, {}, {}
        for i in sel:
            g = g32[i]
            b = decay_arr.reshape((-1,) + (1,) * g.ndim)  # one EMA per decay
            # Not optax.tree.update_moment ((1-β)G + βm): under jit the other operand
            # order of this sum changes its last bit (FMA contraction; measured).
            emas[i] = jnp.where(first, g[None], b * emas_old[i] + (1.0 - b) * g[None])
            diff[i] = g - jnp.where(first, g, prev_old[i])
            raw = _raw(g, emas[i], diff[i])
            s = _rms(raw)
            feats[i] = (_normalised(raw, s), s)
            # The features of step t-1, rebuilt (bit for bit what that step computed).
            x_last = _rebuilt(prev_old[i], emas_old[i], diff_old[i], pscale_old[i])
            # Materialised: fused into its consumers (a YNNPACK dot on CPU), the
            # products could be reordered, and the bits differ from step t-1's.
            lasts[i] = x_last = jax.lax.optimization_barrier(x_last)
            if k == 1:  # the input is step t-1's; the target G_t alone
                inputs[i], targets[i] = x_last, g.reshape(-1)
            else:  # the input is step t-k's; the target G_{t-k+1} + ... + G_t
                inputs[i] = ring_old[i][jnp.mod(count - 1, k - 1)]
                x0 = _by_step(ring_old[i][:, 0], x_last[0], count)
                scales = _by_step(rscale_old[i], pscale_old[i], count)
                w = jnp.where(jnp.arange(k) != jnp.mod(count, k), scales, 0.0)
                targets[i] = jnp.einsum("k,kn->n", w, x0) + g.reshape(-1)

        def per_leaf(predictor):
            fs = [flat(getattr(predictor, f)) for f in GCWv2Predictor._fields]
            return {i: dict(zip(GCWv2Predictor._fields, [f[i] for f in fs])) for i in sel}

        def neg_objective(predictor):
            ps = per_leaf(predictor)
            js, valids = [], []
            for i in sel:
                j, valid = gc_w_v2_objective(ps[i], inputs[i], targets[i], rho)
                js.append(j)
                valids.append(valid)
            js, valids = jnp.stack(js), jnp.stack(valids)
            n_valid = jnp.sum(valids)
            return -jnp.sum(js), (jnp.sum(js) / jnp.maximum(n_valid, 1), n_valid)

        (_, (mean_j, n_valid)), grads = jax.value_and_grad(neg_objective, has_aux=True)(
            state.predictor
        )
        upd, new_opt_state = predictor_tx.update(grads, state.predictor_opt_state, state.predictor)
        new_predictor = optax.apply_updates(state.predictor, upd)
        ok = (
            ready
            & finite
            & (n_valid > 0)
            & jnp.isfinite(mean_j)
            & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_predictor)]))
        )
        predictor = optax.tree.where(ok, new_predictor, state.predictor)
        opt_state = optax.tree.where(ok, new_opt_state, state.predictor_opt_state)

        applied = (count >= warmup) & finite
        ps = per_leaf(predictor)
        out = list(leaves)
        emas_l, prev_l, diff_l = list(emas_old), list(prev_old), list(diff_old)
        pscale_l, ring_l, rscale_l = list(pscale_old), list(ring_old), list(rscale_old)
        for i in sel:
            x, s = feats[i]
            delta = (s * gc_w_v2_offset(ps[i], x, rho)).reshape(leaves[i].shape)
            corrected = (g32[i] + delta).astype(leaves[i].dtype)
            fits = jnp.all(jnp.isfinite(corrected))  # no overflow of the leaf's dtype
            out[i] = jnp.where(applied & fits, corrected, leaves[i])
            emas_l[i], prev_l[i], diff_l[i], pscale_l[i] = emas[i], g32[i], diff[i], s
            if k > 1:  # step t-1's features replace step t-k's
                slot = jnp.mod(count - 1, k - 1)
                ring_l[i] = ring_old[i].at[slot].set(lasts[i])
                rscale_l[i] = rscale_old[i].at[slot].set(pscale_old[i])
        unflat = lambda v: jax.tree_util.tree_unflatten(treedef, v)
        new_state = GCWv2State(
            count=optax.safe_increment(count),
            emas=unflat(emas_l),
            prev_grad=unflat(prev_l),
            prev_diff=unflat(diff_l),
            prev_scale=unflat(pscale_l),
            ring=unflat(ring_l),
            ring_scale=unflat(rscale_l),
            predictor=predictor,
            predictor_opt_state=opt_state,
            objective=jnp.where(ok, mean_j, state.objective).astype(jnp.float32),
            predictor_steps=jnp.where(
                ok, optax.safe_increment(state.predictor_steps), state.predictor_steps
            ),
        )
        new_state = optax.tree.where(finite, new_state, state)
        return unflat(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def gc_w_v2_states(opt_state: Any) -> list[GCWv2State]:
    """Every :class:`GCWv2State` inside ``opt_state`` (chained, masked, injected...)."""
    is_state = lambda x: isinstance(x, GCWv2State)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def gc_w_v2_effective_filter(
    predictor_leaf: dict[str, jax.Array] | GCWv2Predictor,
    x: jax.Array,
    rho: float | jax.Array = np.inf,
) -> tuple[jax.Array, jax.Array]:
    """What one kernel's predictor does, as a linear filter over its tokens.

    Least-squares coefficients ``c`` (``(T,)``) with ``ΔX ≈ Σ_j c_j x_j`` over the
    coordinates of features ``x`` ``(T, n)`` (the unbounded offset by default),
    and the fraction of ``ΔX``'s energy that this linear fit explains.
    """
    dx = gc_w_v2_offset(predictor_leaf, x, rho)
    c, *_ = jnp.linalg.lstsq(x.T, dx)
    resid = dx - c @ x
    r2 = 1.0 - jnp.sum(resid**2) / jnp.maximum(jnp.sum((dx - dx.mean()) ** 2), _TINY)
    return c, r2


def gc_w_v2_memory_floats(params: Any, **kwargs: Any) -> dict[str, int]:
    """Extra state of ``gc_w_v2(**kwargs)`` for ``params``, counted from its arrays.

    Parts: ``"buffers"`` (emas, prev_grad, prev_diff, prev_scale, ring, ring_scale),
    ``"predictor"``, ``"predictor_adam"``, ``"scalars"``, ``"total"`` (element
    counts) and ``"bytes"``; nothing is allocated (``jax.eval_shape``).
    """
    shapes = jax.eval_shape(gc_w_v2(**kwargs).init, params)
    return memory_parts(
        shapes,
        {
            "buffers": (
                shapes.emas,
                shapes.prev_grad,
                shapes.prev_diff,
                shapes.prev_scale,
                shapes.ring,
                shapes.ring_scale,
            ),
            "predictor": shapes.predictor,
            "predictor_adam": shapes.predictor_opt_state,
            "scalars": (shapes.count, shapes.objective, shapes.predictor_steps),
        },
    )
