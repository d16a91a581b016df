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
from gcgd_jax.transforms.gc_w import _static_int

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
    ``optax.MaskedNode()``. ``K`` decays, ``T = K + 2`` tokens, horizon ``k``, ``n`` = size."""

    count: jax.Array  # () int32: steps taken with finite gradients.
    emas: Any  # (K, *shape): m_β = β m_β + (1-β) G per decay, started at the first gradient.
    prev_grad: Any  # (*shape): G_{t-1} (G_0 before the second step).
    stored: Any  # (k, T, n): normalised features of the last k steps (ring, slot t mod k).
    stored_scale: Any  # (k,): their normalisation s (0 where a slot is still empty).
    predictor: GCWv2Predictor  # the predictor's parameters.
    predictor_opt_state: Any  # optax.adam state of the predictor.
    objective: jax.Array  # () float32: mean over kernels of the last training objective J.
    predictor_steps: jax.Array  # () int32: predictor optimiser steps taken.


def _is_kernel(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(jnp.shape(x)) >= 2


def gc_w_v2_features(g: jax.Array, emas: jax.Array, prev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalised token features of one kernel: ``(x, s)``.

    ``x`` is ``(T, n)``: rows ``[G, m_{β_1}, …, m_{β_K}, G - G_{t-1}] / s`` with
    ``s`` the RMS of all ``T·n`` raw entries (``x = 0`` where ``s = 0``).
    """
    raw = jnp.concatenate(
        [g.reshape(1, -1), emas.reshape(emas.shape[0], -1), (g - prev).reshape(1, -1)], axis=0
    )
    a = jnp.max(jnp.abs(raw))
    a_safe = jnp.where(a > 0, a, 1.0)
    s = a * jnp.sqrt(jnp.mean(jnp.square(raw / a_safe)))  # rms without overflow
    s_safe = jnp.where(s > 0, s, 1.0)
    return raw / s_safe, s


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

      q_i = W_q x_i + b_q, \quad k_{ij} = x_{ij} u + e_j, \quad v_{ij} = w_j x_{ij},
      \quad \Delta X_i = \sum_h \sum_j \mathrm{softmax}_j\!\Big(\frac{q_i\cdot k_{ij}}
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
    of the last ``k`` steps are stored; at step ``t`` (``t >= k``) one Adam
    step (``predictor_learning_rate``) on ``-ΣJ`` uses the stored input of
    step ``t-k`` and the target :math:`\bar G` made of the gradients
    ``t-k+1 .. t`` (strictly after the input: no target leak); then this
    step's offset is computed with the updated predictor. No extra
    forward/backward pass of the network. During the first ``warmup`` steps
    the predictor trains but is not applied.

    **Status.** Measured in ``experiments/results/gc_w_study/`` with every
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
    skips the step) and the state is returned unchanged.

    **Memory** (float32 words, ``N`` selected kernel entries):
    ``(K + 1 + k T) N + k`` per kernel set of buffers plus
    ``3 (h(2Td + 2d + T) + T)`` per kernel for the predictor and its Adam
    state (:func:`gc_w_v2_memory_floats`). Defaults (``K = 3, k = 1``):
    9 words per selected parameter.

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
    horizon = _static_int("horizon", horizon, 1)
    num_heads = _static_int("num_heads", num_heads, 1)
    head_size = _static_int("head_size", head_size, 1)
    check_number("predictor_learning_rate", predictor_learning_rate, lower=0.0)
    check_number("warmup", warmup, lower=0.0)
    if isinstance(key, (bool, np.bool_)):
        raise ValueError(f"`key` must be an int seed or a PRNG key, got {key!r}.")  # noqa: TRY004
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
        bufs = {name: [] for name in ("emas", "prev_grad", "stored", "stored_scale")}
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
            bufs["stored"].append(jnp.zeros((k, n_tok, n), jnp.float32))
            bufs["stored_scale"].append(jnp.zeros((k,), jnp.float32))
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
        flat = lambda tree: treedef.flatten_up_to(tree)
        sel = [i for i, g in enumerate(leaves) if _is_kernel(g)]
        if not sel:
            return updates, state
        count = state.count
        g32 = {i: leaves[i].astype(jnp.float32) for i in sel}
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g32[i])) for i in sel]))
        first = count == 0
        emas_old, prev_old = flat(state.emas), flat(state.prev_grad)
        stored_old, scale_old = flat(state.stored), flat(state.stored_scale)
        emas, prev, feats = {}, {}, {}
        for i in sel:
            g = g32[i]
            b = decay_arr.reshape((-1,) + (1,) * g.ndim)  # one EMA per decay
            # Not optax.tree.update_moment ((1-β)G + βm): under jit the other operand
            # order of this sum changes its last bit (FMA contraction; measured).
            emas[i] = jnp.where(first, g[None], b * emas_old[i] + (1.0 - b) * g[None])
            prev[i] = jnp.where(first, g, prev_old[i])
            feats[i] = gc_w_v2_features(g, emas[i], prev[i])

        slot = jnp.mod(count, k)  # written k steps ago: the training input
        ready = count >= k

        def per_leaf(predictor):
            fs = [flat(getattr(predictor, f)) for f in GCWv2Predictor._fields]
            return {i: dict(zip(GCWv2Predictor._fields, [f[i] for f in fs])) for i in sel}

        def neg_objective(predictor):
            ps = per_leaf(predictor)
            js, valids = [], []
            for i in sel:
                x_in = stored_old[i][slot]
                others = jnp.arange(k) != slot  # the k-1 inputs after it
                w = jnp.where(others, scale_old[i], 0.0)
                target = jnp.einsum("k,kn->n", w, stored_old[i][:, 0]) + g32[i].reshape(-1)
                j, valid = gc_w_v2_objective(ps[i], x_in, target, rho)
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
        new_stored, new_scale = list(stored_old), list(scale_old)
        for i in sel:
            x, s = feats[i]
            delta = (s * gc_w_v2_offset(ps[i], x, rho)).reshape(leaves[i].shape)
            corrected = (g32[i] + delta).astype(leaves[i].dtype)
            out[i] = jnp.where(applied, corrected, leaves[i])
            new_stored[i] = stored_old[i].at[slot].set(x)
            new_scale[i] = scale_old[i].at[slot].set(s)
        unflat = lambda v: jax.tree_util.tree_unflatten(treedef, v)
        emas_l, prev_l = list(emas_old), list(prev_old)
        for i in sel:
            emas_l[i], prev_l[i] = emas[i], g32[i]
        new_state = GCWv2State(
            count=optax.safe_increment(count),
            emas=unflat(emas_l),
            prev_grad=unflat(prev_l),
            stored=unflat(new_stored),
            stored_scale=unflat(new_scale),
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

    Parts: ``"buffers"`` (emas, prev_grad, stored, stored_scale),
    ``"predictor"``, ``"predictor_adam"``, ``"scalars"``, ``"total"`` (element
    counts) and ``"bytes"``; nothing is allocated (``jax.eval_shape``).
    """
    shapes = jax.eval_shape(gc_w_v2(**kwargs).init, params)
    return memory_parts(
        shapes,
        {
            "buffers": (shapes.emas, shapes.prev_grad, shapes.stored, shapes.stored_scale),
            "predictor": shapes.predictor,
            "predictor_adam": shapes.predictor_opt_state,
            "scalars": (shapes.count, shapes.objective, shapes.predictor_steps),
        },
    )
