"""GEM: the closest update that increases no old task's memory loss (dual QP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common, _memory

__all__ = ["gem"]


def gem(memory_strength: float = 0.5, eps: float = 1e-3) -> optax.GradientTransformationExtraArgs:
    r"""Gradient episodic memory: project the update into the cone of the old tasks' gradients.

    With :math:`g` the update (whole network, flattened), :math:`G` the
    :math:`n \times p` matrix of the valid memory gradients :math:`g_k` and
    :math:`c = G g`: if :math:`c_k \ge 0` for every task the update passes
    through; otherwise

    .. math::

      v^\star = \operatorname*{arg\,min}_{v \ge m}\;
        \tfrac12\, v^\top (G G^\top + \epsilon I)\, v + c^\top v, \qquad
      \tilde g = g + G^\top v^\star .

    This is GEM's dual QP as the official code (``project2cone2``) solves it with
    ``quadprog``: :math:`\epsilon` (``1e-3``) regularises the Gram matrix and the
    margin :math:`m` (``memory_strength``; ``0.5`` in the authors' scripts) bounds
    the multipliers from below (the paper's "small constant added to
    :math:`v^\star`" that favours backward transfer). With :math:`m = \epsilon = 0`
    it is the paper's projection :math:`\min \lVert \tilde g - g\rVert^2` s.t.
    :math:`G\tilde g \ge 0`.

    What it promises, from the QP's optimality conditions:
    :math:`g_k^\top \tilde g \ge -\epsilon\, v^\star_k` for every task, with
    equality where :math:`v^\star_k > m`. With :math:`\epsilon = 0` no old task's
    loss increases to first order; with the official :math:`\epsilon = 10^{-3}` a
    task whose multiplier exceeds the margin ends slightly negative. With
    :math:`m > 0` a projected update always moves along every :math:`g_k` (by at
    least :math:`m g_k`), also along those it did not conflict with.

    The QP is solved inside ``jit`` by Lawson and Hanson's active-set method for
    non-negative least squares, run on :math:`w = v - m \ge 0` with the Gram
    matrix (Bro and de Jong's form): it ends at the exact optimum (as
    ``quadprog``'s dual active-set method does) after a few ``n x n`` solves,
    at most ``3 n`` outer steps. Our choice, over an interior-point solver such as
    ``qpax``: the problem is tiny (one multiplier per task, box constraints), an
    active-set method reproduces the constraints that hold at the margin exactly,
    where an interior-point method reaches them only to its tolerance (``>= 1e-5`` in
    float32, per ``qpax``'s documentation), and no dependency is added.

    Args:
      memory_strength: the margin :math:`m \ge 0`, the lower bound of every
        multiplier.
      eps: :math:`\epsilon \ge 0` added to the Gram matrix's diagonal. ``0`` needs
        linearly independent memory gradients.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` whose ``update``
      takes ``memory_grads`` (the params' tree, every leaf with a leading task axis
      ``K``) and ``memory_mask`` (``(K,)`` bool, ``None``: all rows valid) as
      keyword arguments; without ``memory_grads`` the update passes through. Numeric
      arguments may be injected with :func:`optax.inject_hyperparams`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gcgd_jax.transforms.gem import gem
      >>> tx = gem(memory_strength=0.0, eps=0.0)
      >>> g = {"w": jnp.array([1.0, -1.0, 0.0])}
      >>> memory = {"w": jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])}
      >>> out, _ = tx.update(g, tx.init(g), memory_grads=memory)
      >>> out["w"].tolist()  # the conflict with task 0 is removed
      [1.0, 0.0, 0.0]

    References:
      Lopez-Paz and Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, 2017

      Bro and de Jong, `A fast non-negativity-constrained least squares algorithm
      <https://doi.org/10.1002/(SICI)1099-128X(199709/10)11:5%3C393::AID-CEM483%3E3.0.CO;2-L>`_,
      1997
    """
    _common.check_number("memory_strength", memory_strength, lower=0.0)
    _common.check_number("eps", eps, lower=0.0)

    def correct(mem: _memory.Memory) -> list:
        num_tasks = mem.mask.shape[0]
        gram = sum(
            jnp.matmul(
                m.reshape(num_tasks, -1), m.reshape(num_tasks, -1).T, precision=_memory.HIGHEST
            )
            for m in mem.memories
        )
        c = _memory.task_dots(mem.memories, mem.grads)
        quad = gram + eps * jnp.eye(num_tasks, dtype=gram.dtype)
        margin = jnp.where(mem.mask, jnp.asarray(memory_strength, gram.dtype), 0)
        # v = w + margin: min 1/2 w'Qw - b'w over w >= 0, b = -(c + Q margin)
        b = -(c + jnp.matmul(quad, margin, precision=_memory.HIGHEST))
        v = margin + nonnegative_qp(quad, b, mem.mask)
        conflict = jnp.any(mem.mask & (c < 0))
        v = jnp.where(conflict, v, 0)
        return [
            g + jnp.tensordot(v, m, axes=1, precision=_memory.HIGHEST)
            for g, m in zip(mem.grads, mem.memories)
        ]

    return _memory.memory_transformation(correct)


def nonnegative_qp(quad: jax.Array, b: jax.Array, active: jax.Array) -> jax.Array:
    r"""``argmin_{w >= 0} 1/2 w' Q w - b' w`` over the ``active`` entries (others are 0).

    Lawson and Hanson's active-set method in Bro and de Jong's form (it needs only
    :math:`Q` and :math:`b`): grow the set of positive entries by the one with the
    largest negative gradient; after each unconstrained solve on that set, step back
    to the last feasible point and drop the entries that reached zero. ``Q`` must be
    positive definite on the active entries. Stops at the optimum (to a tolerance of
    ``10 n`` rounding errors of the gradient) or after ``3 n`` outer steps.
    """
    n = quad.shape[0]
    finfo = jnp.finfo(quad.dtype)
    eye = jnp.eye(n, dtype=quad.dtype)
    zero = jnp.zeros((n,), quad.dtype)
    scale_q, scale_b = jnp.max(jnp.abs(quad)), jnp.max(jnp.abs(b))

    def solve(passive):
        a = jnp.where(passive[:, None] & passive[None, :], quad, eye)
        return jnp.where(passive, jnp.linalg.solve(a, jnp.where(passive, b, 0)), 0)

    def gradient(w):  # the negative gradient b - Q w, and what counts as positive
        tol = 10 * n * finfo.eps * (scale_b + scale_q * jnp.max(jnp.abs(w)))
        return b - jnp.matmul(quad, w, precision=_memory.HIGHEST), tol

    def outer_cond(carry):
        w, passive, step = carry
        neg_grad, tol = gradient(w)
        return (step < 3 * n) & jnp.any(active & ~passive & (neg_grad > tol))

    def outer_body(carry):
        w, passive, step = carry
        neg_grad, _ = gradient(w)
        j = jnp.argmax(jnp.where(active & ~passive, neg_grad, -jnp.inf))
        passive = passive.at[j].set(True)

        def inner_cond(inner):
            _, passive, s, k = inner
            return (k < n) & jnp.any(passive & (s <= 0))

        def inner_body(inner):
            w, passive, s, k = inner
            blocking = passive & (s <= 0)
            ratio = jnp.where(blocking, _common.safe_divide(w, w - s), jnp.inf)
            i = jnp.argmin(ratio)
            w = jnp.maximum(w + ratio[i] * (s - w), 0)
            passive = passive.at[i].set(False) & (w > 0)
            return w, passive, solve(passive), k + 1

        w, passive, s, _ = jax.lax.while_loop(
            inner_cond, inner_body, (w, passive, solve(passive), 0)
        )
        return jnp.maximum(s, 0), passive, step + 1

    w, _, _ = jax.lax.while_loop(outer_cond, outer_body, (zero, jnp.zeros((n,), bool), 0))
    return w
