"""A-GEM: project the gradient when it conflicts with the mean memory gradient."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common, _memory


def agem(memory_strength: float = 0.0, eps: float = 0.0) -> optax.GradientTransformationExtraArgs:
    r"""Averaged gradient episodic memory: no first-order increase of the reference loss.

    With :math:`g` the update (the current task's gradient, over the whole network)
    and :math:`g_{\mathrm{ref}} = \frac1n \sum_k g_k` the mean of the ``n`` valid
    memory gradients,

    .. math::

      \tilde g = \begin{cases}
        g & g^\top g_{\mathrm{ref}} \ge 0, \\
        g + \max\Bigl(m,\; -\dfrac{g^\top g_{\mathrm{ref}}}
              {g_{\mathrm{ref}}^\top g_{\mathrm{ref}} + \epsilon}\Bigr)\, g_{\mathrm{ref}}
        & \text{otherwise.}
      \end{cases}

    With the defaults :math:`m = \epsilon = 0` this is A-GEM's rule (the paper's
    projection, and ``tf.cond(dotp >= 0, ...)`` in the official code):
    :math:`\tilde g = g - \frac{g^\top g_{\mathrm{ref}}}{g_{\mathrm{ref}}^\top
    g_{\mathrm{ref}}} g_{\mathrm{ref}}` on a conflict, so
    :math:`\tilde g^\top g_{\mathrm{ref}} = 0`: the *mean* memory loss does not
    increase to first order. Single tasks are not protected: :math:`\tilde g^\top
    g_k` may be negative for a task whose gradient differs from the mean.
    ``memory_strength=0.5, eps=1e-3`` reproduce the A-GEM baseline of the layerwise
    decomposition paper's code (``tangshixiang/grad-cl``, ``model/agem.py``), which
    solves GEM's dual QP with :math:`g_{\mathrm{ref}}` as its single constraint (the
    closed form above is that QP's solution). Then :math:`\tilde g^\top
    g_{\mathrm{ref}} \ge \epsilon\, g^\top g_{\mathrm{ref}} / (\lVert
    g_{\mathrm{ref}}\rVert^2 + \epsilon)`: slightly negative for :math:`\epsilon > 0`,
    and a conflicting update is pushed past the projection by :math:`m` when the
    conflict is small.

    A-GEM draws :math:`g_{\mathrm{ref}}` from one batch of the pooled episodic
    memory; pass that gradient as ``memory_grads`` with ``K = 1`` for that
    variant. The mean over tasks is our reading of "the average episodic memory
    gradient" when per-task gradients are at hand (as in ``grad-cl``).

    Args:
      memory_strength: the margin :math:`m \ge 0` on the multiplier of
        :math:`g_{\mathrm{ref}}` (``0``: A-GEM).
      eps: :math:`\epsilon \ge 0` added to :math:`\lVert g_{\mathrm{ref}}\rVert^2`
        (``0``: A-GEM).

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs` whose ``update``
      takes ``memory_grads`` (the params' tree, every leaf with a leading task axis
      ``K``) and ``memory_mask`` (``(K,)`` bool, ``None``: all rows valid) as
      keyword arguments; without ``memory_grads`` the update passes through. Numeric
      arguments may be injected with :func:`optax.inject_hyperparams`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gcgd_jax.transforms.agem import agem
      >>> tx = agem()
      >>> g = {"w": jnp.array([1.0, -1.0])}
      >>> memory = {"w": jnp.array([[0.0, 2.0], [0.0, 0.0]])}  # g_ref = (0, 1)
      >>> out, _ = tx.update(g, tx.init(g), memory_grads=memory)
      >>> out["w"].tolist()
      [1.0, 0.0]

    References:
      Chaudhry et al, `Efficient Lifelong Learning with A-GEM
      <https://arxiv.org/abs/1812.00420>`_, 2019
    """
    _common.check_number("memory_strength", memory_strength, lower=0.0)
    _common.check_number("eps", eps, lower=0.0)

    def correct(mem: _memory.Memory) -> list:
        count = jnp.maximum(mem.count, 1)
        ref = [m.sum(axis=0) / count for m in mem.memories]
        dotp = _memory.dot(mem.grads, ref)
        ref_sq = _memory.dot(ref, ref)
        coef = jnp.maximum(memory_strength, _common.safe_divide(-dotp, ref_sq + eps))
        coef = jnp.where(dotp < 0, coef, 0).astype(dotp.dtype)
        return [g + coef * r for g, r in zip(mem.grads, ref)]

    return _memory.memory_transformation(correct)
