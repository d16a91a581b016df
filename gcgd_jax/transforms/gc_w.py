"""GC-W: learned weight-gradient correction (the GC-W module of GCGD, our design).

Li et al.'s GCGD paper describes GC-W only in words (an attention-like
structure predicts a gradient offset ``ΔG``; ``Ĝ = G + ΔG``; trained
asynchronously towards "optimal gradient directions and scales according to
historical training information") and was withdrawn with its structure
section marked wrong. Everything concrete below is therefore our design,
made explicit and tested. This module is version 1 (attention across output
units, one predictor step per window); version 2, a per-coordinate filter over
the gradient's time scales trained every step, is
:mod:`gcgd_jax.transforms.gc_w_v2`. Both stay available: ``gc_w`` is v1.
"""

from __future__ import annotations

import math
import operator
import zlib
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gcgd_jax.transforms._common import check_number, concrete_value, memory_parts

__all__ = [
    "GCWPredictor",
    "GCWState",
    "GCWTarget",
    "gc_w",
    "gc_w_memory_floats",
    "gc_w_predictor_loss",
    "gc_w_states",
]

GCWTarget = Literal["window_mean", "next_gradient"]
_TARGETS: tuple[str, ...] = get_args(GCWTarget)
# History tokens are divided by max(s, rms(M) / _MAX_HISTORY_RATIO): their RMS
# is at most this many times the current tokens' RMS (keeps logits bounded when
# the gradient collapses while its history does not).
_MAX_HISTORY_RATIO = 10.0
_TINY = 1e-12


class GCWPredictor(NamedTuple):
    """Parameters of the per-leaf attention predictors (float32).

    Each field is a tree with the structure of the selected parameters; for a
    leaf with ``n`` fan-in elements, ``h`` heads of size ``d``:
    """

    w_q: Any  # (n, h*d) query projection of the current-gradient tokens.
    w_k: Any  # (n, h*d) key projection of current and history tokens.
    w_v: Any  # (n, h*d) value projection of current and history tokens.
    w_o: Any  # (h*d, n) output projection; zero at init, so ΔG = 0.
    b_k: Any  # (2, h*d) key bias per token source (row 0 current, row 1 history).
    b_v: Any  # (2, h*d) value bias per token source.
    mix: Any  # (2,) direct weights of the unit's own current and history token; zero at init.


class GCWState(NamedTuple):
    """State of :func:`gc_w`. Per-leaf buffers are float32 with the leaf's shape."""

    count: jax.Array  # () int32: steps taken with finite gradients.
    ema: Any  # history M_t = β M_{t-1} + (1-β) G_t (not bias-corrected).
    stored_grad: Any  # G at the start of the current window (predictor input).
    stored_ema: Any  # bias-corrected M at the start of the current window.
    target_sum: Any  # weighted sum of the raw gradients after the window start.
    predictor: GCWPredictor  # the predictor's parameters.
    predictor_opt_state: Any  # optax.adam state of the predictor.
    predictor_loss: jax.Array  # () float32: loss of the last predictor step (0 before).
    predictor_steps: jax.Array  # () int32: predictor optimiser steps taken.


def _check_int(name: str, value: Any, lower: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer ``>= lower``.

    Traced values (``optax.inject_hyperparams``) are not checked.
    """
    if isinstance(value, jax.core.Tracer):
        return
    v = None if isinstance(value, (bool, np.bool_, str, bytes)) else concrete_value(value)
    if v is None or math.isnan(v) or v != int(v) or v < lower:
        raise ValueError(f"`{name}` must be an integer >= {lower}, got {value!r}.")


def static_int(name: str, value: Any, lower: int) -> int:
    """A shape-deciding argument as a Python int (``ValueError`` naming it otherwise)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be an int >= {lower}, got {value!r}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(
            f"`{name}` must be a Python int >= {lower} (it decides shapes; with "
            f"optax.inject_hyperparams pass static_args=('{name}',)), got {value!r}."
        ) from None
    if v < lower:
        raise ValueError(f"`{name}` must be an int >= {lower}, got {value!r}.")
    return v


def _check_leaves(tree: Any, what: str) -> None:
    """``ValueError`` naming the first leaf that is not a float kernel of ndim >= 2."""

    def visit(key_path, leaf):
        shape = jnp.shape(leaf)
        dtype = getattr(leaf, "dtype", None)
        if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"gc_w: the {what} leaf {jax.tree_util.keystr(key_path)} with shape {shape} and "
                f"dtype {dtype} is not a float kernel with output units on the last axis "
                "(dense (in, out) or conv (..., in, out)). Select the kernels with "
                "optax.masked(gc_w(...), mask)."
            )

    jax.tree_util.tree_map_with_path(visit, tree)


def _rms(x: jax.Array) -> jax.Array:
    """Root mean square of ``x`` without overflow for large finite entries."""
    a = jnp.max(jnp.abs(x))
    a_safe = jnp.where(a > 0, a, 1.0)
    return a * jnp.sqrt(jnp.mean(jnp.square(x / a_safe)))


def _tokens(x: jax.Array) -> jax.Array:
    """``(..., C)`` -> ``(C, n)``: one token per output unit."""
    return x.reshape(-1, x.shape[-1]).T


def _predict(p: dict, g: jax.Array, m: jax.Array, rho, num_heads: int, head_size: int):
    """Bounded offset for one leaf, in units of ``s = rms(g)``.

    Returns ``(dx, xg, s)`` with ``dx`` and ``xg = g/s`` as ``(C, n)`` tokens;
    ``ΔG = s · dx``.
    """
    s = _rms(g)
    s_safe = jnp.where(s > 0, s, 1.0)
    xg = _tokens(g) / s_safe
    m_scale = jnp.maximum(s_safe, _rms(m) / _MAX_HISTORY_RATIO)
    xm = _tokens(m) / m_scale
    c = xg.shape[0]
    hd = num_heads * head_size
    tokens = jnp.concatenate([xg, xm], axis=0)  # (2C, n)
    source = jnp.repeat(jnp.arange(2), c)  # 0 current, 1 history
    # Weights are stored at unit scale and multiplied by 1/sqrt(fan-in) here, so
    # one Adam learning rate suits every kernel size.
    in_scale = 1.0 / math.sqrt(xg.shape[1])
    q = (in_scale * (xg @ p["w_q"])).reshape(c, num_heads, head_size)
    k = (in_scale * (tokens @ p["w_k"]) + p["b_k"][source]).reshape(2 * c, num_heads, head_size)
    v = (in_scale * (tokens @ p["w_v"]) + p["b_v"][source]).reshape(2 * c, num_heads, head_size)
    logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_size)
    attn = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("hqk,khd->qhd", attn, v).reshape(c, hd)
    dx = (out @ p["w_o"]) / math.sqrt(hd) + p["mix"][0] * xg + p["mix"][1] * xm  # (C, n)
    # Bound ||dx|| <= rho ||xg|| (i.e. ||ΔG|| <= rho ||G||). The double `where`
    # keeps the gradient finite at dx = 0 (the zero-initialised start).
    bound = rho * jnp.sqrt(jnp.sum(jnp.square(xg)))
    nd_sq = jnp.sum(jnp.square(dx))
    big = (nd_sq > jnp.square(bound)) | (bound <= 0)
    scale = jnp.where(big, bound / jnp.sqrt(jnp.where(nd_sq > 0, nd_sq, 1.0)), 1.0)
    scale = jnp.where(bound > 0, scale, 0.0)
    dx = dx * scale
    dx = jnp.where(jnp.all(jnp.isfinite(dx)), dx, 0.0)
    return dx, xg, s


def _leaf_loss(p, g, m, d, rho, scale_weight, num_heads, head_size):
    """(1 - cos(Ĝ, D)) + λ (log||Ĝ|| - log||D||)², in units of rms(g); and validity."""
    dx, xg, s = _predict(p, g, m, rho, num_heads, head_size)
    s_safe = jnp.where(s > 0, s, 1.0)
    dn = jax.lax.stop_gradient(_tokens(d) / s_safe)
    ghat = xg + dx
    g_sq = jnp.sum(jnp.square(ghat))
    d_sq = jnp.sum(jnp.square(dn))
    valid = (s > 0) & (d_sq > _TINY) & jnp.isfinite(d_sq)
    g_norm = jnp.sqrt(g_sq + _TINY)
    d_norm = jnp.sqrt(jnp.where(valid, d_sq, 1.0))
    cos = jnp.sum(ghat * dn) / (g_norm * d_norm)
    loss = (1.0 - cos) + scale_weight * jnp.square(jnp.log(g_norm) - jnp.log(d_norm))
    return jnp.where(valid, loss, 0.0), valid


def gc_w(
    rho: float = 0.5,
    window: int = 10,
    warmup: int = 100,
    beta: float = 0.9,
    num_heads: int = 1,
    head_size: int = 32,
    predictor_learning_rate: float = 1e-2,
    scale_weight: float = 0.1,
    target: GCWTarget = "window_mean",
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GC-W: a learned, bounded, attention-based offset added to kernel gradients.

    For every kernel leaf with gradient :math:`G_t` (Flax layout, output units
    on the last axis, ``n`` = fan-in size, ``C`` = output units):

    .. math::

      M_t &= \beta M_{t-1} + (1-\beta) G_t, \qquad
      \hat M_t = M_t / (1 - \beta^{t+1}), \qquad s = \mathrm{rms}(G_t) \\
      X_G &= \mathrm{tokens}(G_t)/s, \quad X_M = \mathrm{tokens}(\hat M_t)/
        \max(s, \mathrm{rms}(\hat M_t)/10) \quad (C \times n) \\
      Q &= X_G A_q/\sqrt n,\ K = [X_G; X_M] A_k/\sqrt n + b_k,\
        V = [X_G; X_M] A_v/\sqrt n + b_v \\
      \Delta X &= \mathrm{softmax}(Q K^\top/\sqrt{d})\, V A_o/\sqrt{hd}
        + a_G X_G + a_M X_M \\
      \Delta X &\leftarrow \Delta X \cdot \min(1, \rho \|X_G\| / \|\Delta X\|) \\
      \hat G_t &= G_t + s \cdot \mathrm{untokens}(\Delta X)

    (``h`` heads of size ``d``, concatenated; ``b_k, b_v`` are learned biases
    per token source, current or history; the tokens are the output units).
    Besides the attention path (which mixes units and is low-rank, ``h d``, in
    the fan-in space) two learned scalars ``a_G, a_M`` mix each unit's own
    current and history token at full rank: with them the predictor can learn
    a bounded, data-driven momentum, which is what it learns first on noisy
    problems (``tests/transforms/test_gc_w_learning.py``). Weights are stored
    at unit scale (the ``1/√fan-in`` factors are in the forward pass), so one
    Adam learning rate suits every kernel size. The bound gives
    :math:`\|\Delta G\| \le \rho \|G\|` per tensor, and for :math:`\rho < 1`
    the update stays a descent direction:
    :math:`\langle \hat G, G\rangle \ge (1-\rho)\|G\|^2`. ``A_o``, ``a_G`` and
    ``a_M`` start at zero, so the first updates equal the input gradients
    exactly.

    **Asynchronous training.** Steps are grouped in windows of ``window``
    steps. At a window start ``t`` (``count % window == 0``) the predictor's
    inputs :math:`(G_t, \hat M_t)` are stored. The target uses strictly future
    gradients: ``"window_mean"``: :math:`D = \frac1k \sum_{j=1}^{k} G_{t+j}`;
    ``"next_gradient"``: :math:`D = G_{t+1}`. At step ``t + k`` (the next
    window start, whose gradient is the window's last) one Adam step
    (``predictor_learning_rate``) on the stored inputs minimises

    .. math::

      (1 - \cos(\hat G_t, D)) + \lambda\,(\log\|\hat G_t\| - \log\|D\|)^2

    (``λ = scale_weight``, :math:`D` under stop-gradient, summed over leaves
    each with its own predictor, reported as the mean), inside ``lax.cond``;
    then the new window's inputs are stored. The step's offset is computed
    with the predictor after that update. No extra forward/backward pass of
    the network is needed. During the first ``warmup`` steps the predictor
    trains but is not applied (the gradient passes unchanged).

    **What to expect.** The target is where the gradient is going, so GC-W
    helps where the true gradient changes slowly compared with the noise (far
    from the optimum); at the noise floor the future gradients also reflect
    the optimizer's own last steps and GC-W can raise the floor. With the
    optimizer's learning rate tuned for each method, the speed-up of the
    far-from-optimum regime disappears (a tuned learning rate leaves that
    regime within a few steps) and the raised floor remains
    (the *GC-W study* results pages). ``rho < 1`` and the zero start bound
    the damage. This is version 1, kept for the ablation; version 2 is
    :func:`gcgd_jax.transforms.gc_w_v2.gc_w_v2`.

    **Non-finite gradients.** If any selected gradient is not finite, the
    gradients are passed on *unchanged* (so an outer ``optax.apply_if_finite``
    sees them and skips the step) and the state is returned unchanged (no
    counter, history, window or predictor change). A finite gradient whose
    correction would overflow its leaf's dtype (``|G + ΔG|`` above the largest
    finite value: gradients within ``ρ`` of the dtype's limit, most likely in
    float16) is passed on unchanged in that leaf; the state still advances.

    **Memory.** In float32 words, with ``N`` the number of selected
    parameters and ``n_l`` the fan-in size of selected leaf ``l``::

      4 N                                   # ema, stored_grad, stored_ema, target_sum
      + 3 Σ_l (4 n_l h d + 4 h d + 2)       # predictor params, Adam mu and nu
      + 4                                   # counters, loss, Adam's count

    e.g. ResNet-20's three pre-down-sampling kernels with ``h d = 32``: 0.58 M
    words (2.2 MiB); ResNet-18's four: 15.9 M words (60 MiB)
    (measured: the *GC-W memory* results page).

    :func:`gc_w_memory_floats` evaluates it for a parameter tree.

    **Dtypes.** The predictor computes in float32; updates keep the
    gradient's dtype (bf16 in, bf16 out); state dtypes never change.

    Only kernels may be given to it (float leaves with ``ndim >= 2``: dense
    ``(in, out)``, conv ``(kh, kw, in, out)``, also 1-D/3-D conv kernels);
    any other leaf raises ``ValueError`` naming its path. Select kernels with
    :func:`optax.masked` (``optax.MaskedNode`` leaves are skipped). Inside a
    data-parallel ``jax.jit`` step with replicated state and reduced
    gradients every replica computes the same predictor.

    Args:
      rho: bound on the offset, ``||ΔG|| <= rho ||G||`` per tensor (``>= 0``;
        ``0`` disables GC-W while keeping its state and cost).
      window: steps per predictor update and length of the target window
        (int ``>= 1``).
      warmup: steps during which the predictor trains but is not applied
        (int ``>= 0``).
      beta: EMA decay of the history tokens, in ``[0, 1)``.
      num_heads: attention heads ``h`` (static int ``>= 1``).
      head_size: head size ``d`` (static int ``>= 1``).
      predictor_learning_rate: Adam learning rate of the predictor (``>= 0``).
      scale_weight: ``λ``, weight of the log-norm-ratio term (``>= 0``).
      target: ``"window_mean"`` (default) or ``"next_gradient"``.
      key: int seed or PRNG key for the predictor's initial weights.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`GCWState`. The last predictor loss is ``state.predictor_loss``;
      :func:`gc_w_predictor_loss` finds it inside a chained/masked state.
      With ``optax.inject_hyperparams`` pass
      ``static_args=("num_heads", "head_size")``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gcgd_jax
      >>> params = {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}
      >>> mask = {"kernel": True, "bias": False}
      >>> tx = optax.chain(optax.masked(gcgd_jax.gc_w(warmup=0), mask), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.ones(4)}
      >>> updates, state = tx.update(grads, state, params)
      >>> bool(jnp.allclose(updates["kernel"], -0.05))  # identity at the start
      True
      >>> float(gcgd_jax.gc_w_predictor_loss(state))
      0.0

    References:
      Li et al, `Gradient Correction beyond Gradient Descent
      <https://arxiv.org/abs/2203.08345>`_, 2022 (withdrawn; design here is ours).
    """
    check_number("rho", rho, lower=0.0)
    _check_int("window", window, 1)
    _check_int("warmup", warmup, 0)
    check_number("beta", beta, lower=0.0)
    if concrete_value(beta) is not None and not concrete_value(beta) < 1.0:
        raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
    num_heads = static_int("num_heads", num_heads, 1)
    head_size = static_int("head_size", head_size, 1)
    check_number("predictor_learning_rate", predictor_learning_rate, lower=0.0)
    check_number("scale_weight", scale_weight, lower=0.0)
    if target not in _TARGETS:
        raise ValueError(f"`target` must be one of {_TARGETS}, got {target!r}.")
    if isinstance(key, (bool, np.bool_)):
        raise ValueError(f"`key` must be an int seed or a PRNG key, got {key!r}.")
    hd = num_heads * head_size
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
        _check_leaves(params, "parameter")
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        root = make_key()
        fields = {name: [] for name in GCWPredictor._fields}
        for path, leaf in leaves_with_path:
            n = math.prod(leaf.shape[:-1])
            # The leaf's key depends on its path only, so a leaf gets the same
            # predictor whatever else is selected (masked or not).
            path_id = zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF
            kq, kk, kv = jax.random.split(jax.random.fold_in(root, path_id), 3)
            fields["w_q"].append(jax.random.normal(kq, (n, hd), jnp.float32))
            fields["w_k"].append(jax.random.normal(kk, (n, hd), jnp.float32))
            fields["w_v"].append(jax.random.normal(kv, (n, hd), jnp.float32))
            fields["w_o"].append(jnp.zeros((hd, n), jnp.float32))
            fields["b_k"].append(jnp.zeros((2, hd), jnp.float32))
            fields["b_v"].append(jnp.zeros((2, hd), jnp.float32))
            fields["mix"].append(jnp.zeros((2,), jnp.float32))
        predictor = GCWPredictor(
            **{name: jax.tree_util.tree_unflatten(treedef, v) for name, v in fields.items()}
        )

        def zeros():
            # A fresh tree per field: fields sharing one buffer cannot be donated by a
            # jitted train step (XLA: "donate the same buffer twice").
            return optax.tree.zeros_like(params, jnp.float32)  # float leaves only (checked)

        return GCWState(
            count=jnp.zeros([], jnp.int32),
            ema=zeros(),
            stored_grad=zeros(),
            stored_ema=zeros(),
            target_sum=zeros(),
            predictor=predictor,
            predictor_opt_state=predictor_tx.init(predictor),
            predictor_loss=jnp.zeros([], jnp.float32),
            predictor_steps=jnp.zeros([], jnp.int32),
        )

    hyperparams = (rho, window, warmup, beta, predictor_learning_rate, scale_weight)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _check_leaves(updates, "gradient")
        # Called eagerly (outside jit), compile the step once per transform
        # instead of dispatching its few hundred small ops one by one.
        traced = any(
            isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((updates, state, hyperparams))
        )
        return (_update if traced else _update_jit)(updates, state)

    def _update(updates, state):
        g_leaves, treedef = jax.tree_util.tree_flatten(updates)
        flat = treedef.flatten_up_to
        unflat = lambda leaves: jax.tree_util.tree_unflatten(treedef, leaves)
        if not g_leaves:
            return updates, state
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in g_leaves]))
        grads32 = optax.tree.cast(updates, jnp.float32)
        g32 = flat(grads32)
        count = state.count
        # Not optax.tree.update_moment, which sums (1-β)G + βM: under jit XLA's CPU
        # backend contracts the sum into an FMA, and the other operand order changes
        # the last bit of the result (measured), so this keeps GC-W's numerics.
        ema = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, state.ema, grads32)
        # β ** (count + 1) with a float32 exponent, as before.
        ema_hat = flat(optax.tree.bias_correction(ema, beta, (count + 1).astype(jnp.float32)))

        # Window bookkeeping: `since` = steps since the last store (1..window).
        since = jnp.mod(count - 1, window) + 1
        is_end = (count >= 1) & (since == window)
        is_start = jnp.mod(count, window) == 0
        if target == "window_mean":
            weight = 1.0 / jnp.asarray(window, jnp.float32)
        else:  # "next_gradient"
            weight = (since == 1).astype(jnp.float32)
        weight = jnp.where(count >= 1, weight, 0.0)
        target_sum = flat(optax.tree.add_scale(state.target_sum, weight, grads32))

        stored_g = flat(state.stored_grad)
        stored_m = flat(state.stored_ema)

        def per_leaf(predictor):
            fields = [flat(getattr(predictor, f)) for f in GCWPredictor._fields]
            return [dict(zip(GCWPredictor._fields, vals)) for vals in zip(*fields)]

        def total_loss(predictor):
            losses, valids = [], []
            for p, g, m, d in zip(per_leaf(predictor), stored_g, stored_m, target_sum):
                loss, valid = _leaf_loss(p, g, m, d, rho, scale_weight, num_heads, head_size)
                losses.append(loss)
                valids.append(valid)
            losses, valids = jnp.stack(losses), jnp.stack(valids)
            n_valid = jnp.sum(valids)
            return jnp.sum(losses), (jnp.sum(losses) / jnp.maximum(n_valid, 1), n_valid)

        def train(operand):
            predictor, opt_state, loss, steps = operand
            (_, (mean, n_valid)), grads = jax.value_and_grad(total_loss, has_aux=True)(predictor)
            upd, new_opt_state = predictor_tx.update(grads, opt_state, predictor)
            new_predictor = optax.apply_updates(predictor, upd)
            ok = (
                (n_valid > 0)
                & jnp.isfinite(mean)
                & jnp.all(
                    jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_predictor)])
                )
            )
            return (
                optax.tree.where(ok, new_predictor, predictor),
                optax.tree.where(ok, new_opt_state, opt_state),
                jnp.where(ok, mean, loss).astype(jnp.float32),
                jnp.where(ok, optax.safe_increment(steps), steps),
            )

        predictor, opt_state, new_loss, new_steps = jax.lax.cond(
            is_end & finite,
            train,
            lambda operand: operand,
            (
                state.predictor,
                state.predictor_opt_state,
                state.predictor_loss,
                state.predictor_steps,
            ),
        )

        applied = count >= warmup
        out_leaves = []
        for p, g, g_f, m in zip(per_leaf(predictor), g_leaves, g32, ema_hat):
            dx, _, s = _predict(p, g_f, m, rho, num_heads, head_size)
            s_safe = jnp.where(s > 0, s, 1.0)
            delta = (dx.T * s_safe).reshape(g.shape)
            cd = jnp.promote_types(g.dtype, jnp.float32)
            corrected = (g.astype(cd) + delta.astype(cd)).astype(g.dtype)
            fits = jnp.all(jnp.isfinite(corrected))  # no overflow of g's dtype
            out_leaves.append(jnp.where(applied & finite & fits, corrected, g))

        new_stored_g = [jnp.where(is_start, g, o) for g, o in zip(g32, stored_g)]
        new_stored_m = [jnp.where(is_start, m, o) for m, o in zip(ema_hat, stored_m)]
        new_target_sum = [jnp.where(is_start, jnp.zeros_like(t), t) for t in target_sum]
        new_state = GCWState(
            count=optax.safe_increment(count),
            ema=ema,
            stored_grad=unflat(new_stored_g),
            stored_ema=unflat(new_stored_m),
            target_sum=unflat(new_target_sum),
            predictor=predictor,
            predictor_opt_state=opt_state,
            predictor_loss=new_loss,
            predictor_steps=new_steps,
        )
        new_state = optax.tree.where(finite, new_state, state)
        return unflat(out_leaves), new_state

    _update_jit = jax.jit(_update)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gc_w_states(opt_state: Any) -> list[GCWState]:
    """Every :class:`GCWState` inside ``opt_state`` (chained, masked, injected...)."""
    is_state = lambda x: isinstance(x, GCWState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def gc_w_predictor_loss(opt_state: Any) -> jax.Array:
    """The last predictor loss of the GC-W state(s) inside ``opt_state``.

    With several :func:`gc_w` transforms in one optimizer, their mean. Raises
    ``ValueError`` if ``opt_state`` holds no :class:`GCWState`. Jit-safe.

    Example:
      >>> import jax.numpy as jnp, optax, gcgd_jax
      >>> tx = optax.chain(gcgd_jax.gc_w(), optax.sgd(0.1))
      >>> float(gcgd_jax.gc_w_predictor_loss(tx.init({"w": jnp.ones((2, 3))})))
      0.0
    """
    states = gc_w_states(opt_state)
    if not states:
        raise ValueError("gc_w_predictor_loss: the optimizer state holds no GCWState.")
    return jnp.mean(jnp.stack([s.predictor_loss for s in states]))


def gc_w_memory_floats(params: Any, **gc_w_kwargs: Any) -> dict[str, int]:
    """Extra state of ``gc_w(**gc_w_kwargs)`` for ``params``, counted from its arrays.

    Returns element counts per part: ``"buffers"`` (ema, stored_grad,
    stored_ema, target_sum), ``"predictor"`` (its parameters),
    ``"predictor_adam"`` (Adam's state), ``"scalars"``, ``"total"``; and
    ``"bytes"`` (the state's size in bytes). ``params`` may be arrays or
    ``jax.ShapeDtypeStruct``; nothing is allocated (``jax.eval_shape``).
    """
    shapes = jax.eval_shape(gc_w(**gc_w_kwargs).init, params)
    return memory_parts(
        shapes,
        {
            "buffers": (shapes.ema, shapes.stored_grad, shapes.stored_ema, shapes.target_sum),
            "predictor": shapes.predictor,
            "predictor_adam": shapes.predictor_opt_state,
            "scalars": (shapes.count, shapes.predictor_loss, shapes.predictor_steps),
        },
    )
