"""Channel-directed gradients: smoothing along the output-channel axis."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gcgd_jax.transforms import _common

ChannelMetric = Literal["h0", "sobolev"]
METRICS: tuple[str, ...] = get_args(ChannelMetric)

#: Default ``lam`` of the re-weighted H0 metric: deviations from the channel
#: mean are halved. Our choice; the paper's value was not available to us.
H0_DEFAULT_LAM = 2.0


def _sobolev_gains(n: int, lam, dtype) -> jax.Array:
    """Gain of each rfft mode ``k = 0..n//2`` of the periodic Sobolev solve.

    Mode ``k`` of ``-lam * (u[i+1] - 2u[i] + u[i-1])`` is ``lam * e_k`` times
    mode ``k`` of ``u``, with ``e_k = 4 sin^2(pi k / n)``. Mode 0 (the mean) gets
    gain 0 so that ``mean(u) = 0``. ``lam=None`` uses ``lam = 1 / e_1``.
    """
    k = np.arange(n // 2 + 1)
    eig = 4.0 * np.sin(np.pi * k / n) ** 2  # float64, exact to rounding; eig[0] = 0
    inv = np.zeros_like(eig)
    inv[1:] = 1.0 / eig[1:]
    if lam is None:
        return jnp.asarray(inv * eig[1], dtype)
    return jnp.asarray(inv, dtype) / lam


def channel_directed(
    metric: ChannelMetric = "h0",
    lam: float | None = None,
    *,
    include_dense: bool = False,
    axis: int = -1,
) -> optax.GradientTransformation:
    r"""Channel-directed gradients: the gradient in an output-channel metric.

    For each fan-in position of a kernel, the gradient entries along the
    output-channel ``axis`` form a 1-D signal :math:`f` over the :math:`C`
    output channels with mean :math:`m = \operatorname{mean}_o f`. The update is
    the gradient of the loss in a metric on that signal:

    * ``metric="h0"`` (re-weighted :math:`H^0`, metric
      :math:`\bar h \bar k + \lambda\,\overline{(h - \bar h)(k - \bar k)}`):

      .. math:: \hat g = m + (f - m) / \lambda, \qquad \lambda \ge 1.

      :math:`\lambda = 1` is the identity; larger values pull every channel
      toward the channel mean. Default ``lam`` = ``H0_DEFAULT_LAM`` = 2.

    * ``metric="sobolev"`` (metric :math:`\bar h \bar k + \lambda\,
      \overline{h' k'}` on the periodic channel index):

      .. math::
          \hat g = m + u, \quad
          -\lambda\,(u_{i+1} - 2u_i + u_{i-1}) = f_i - m, \quad
          \operatorname{mean}(u) = 0, \quad \text{indices mod } C,

      with :math:`\lambda > 0`, solved exactly with a real FFT along the channel
      axis: Fourier mode :math:`k \ne 0` of :math:`f - m` is multiplied by
      :math:`1 / (\lambda e_k)`, :math:`e_k = 4 \sin^2(\pi k / C)`.
      ``lam`` is in units of the channel index (spacing 1), so the same
      ``lam`` smooths wide layers less: the slowest mode's gain
      :math:`1/(\lambda e_1) \approx C^2 / (4 \pi^2 \lambda)` grows with
      :math:`C` and exceeds 1 (amplifies) when :math:`\lambda < 1/e_1`.
      The default ``lam=None`` therefore picks, per leaf,
      :math:`\lambda_C = 1 / e_1 = 1 / (4 \sin^2(\pi / C))`: the smallest
      value that amplifies no mode (gain of mode :math:`k` is
      :math:`\sin^2(\pi/C) / \sin^2(\pi k/C) \le 1`), i.e. a pure smoother whose
      low-mode gains (about :math:`1/k^2`) hardly depend on the width.

    Both are linear, symmetric and positive definite along the channel axis
    (the channel mean is kept exactly, all other directions are shrunk or, for
    a small Sobolev ``lam``, stretched), so ``ĝ`` is a descent direction; the
    cost is linear (H0) or :math:`O(C \log C)` (Sobolev) per fan-in position.
    A leaf with a single output channel is returned unchanged.

    Which leaves: conv kernels (``ndim >= 4``) by default; with
    ``include_dense`` also ``ndim`` 2 and 3 (dense kernels, 1-D conv kernels).
    Biases and other 1-D leaves, and leaves whose dtype is not a real floating
    type (integer, boolean, ``float0``, complex) pass through untouched.
    Computation is in at least float32; the update keeps the leaf's dtype.

    Args:
      metric: ``"h0"`` or ``"sobolev"``; anything else raises ``ValueError``.
      lam: the metric's weight :math:`\lambda` (``>= 1`` for ``"h0"``, ``> 0``
        for ``"sobolev"``; checked when concrete). ``None`` picks the default
        described above. May be injected with ``optax.inject_hyperparams``
        when given as a number.
      include_dense: also transform leaves with ``ndim`` 2 or 3.
      axis: the output-channel axis (Flax layout: last). Static: with
        ``optax.inject_hyperparams`` pass ``static_args=("axis",)``.

    Returns:
      A stateless :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from gcgd_jax.transforms.channel_directed import channel_directed
      >>> tx = channel_directed("h0", lam=2.0, include_dense=True)
      >>> g = {"kernel": jnp.array([[1.0, 3.0]])}  # one input, two channels
      >>> tx.update(g, tx.init(g))[0]["kernel"].tolist()
      [[1.5, 2.5]]

    Known issue: with jax/jaxlib 0.11.2 on the CPU, ``gcgd-train``'s ResNet train
    step with ``metric="sobolev"`` never finishes its first step (XLA waits
    forever, with one device or two); the transform alone, and the same step on
    jax 0.10.2 and 0.12.1, run (docs: installation, known breaks).

    References:
      Lao et al, `Channel-Directed Gradients for Optimization of Convolutional
      Neural Networks <https://arxiv.org/abs/2008.10766>`_, 2020
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
    if lam is not None:
        if metric == "h0":
            _common.check_number("lam", lam, lower=1.0)
        else:
            _common.check_number("lam", lam, lower=0.0, inclusive=False)
    axis = _common.check_axis(axis)
    min_ndim = 2 if include_dense else 4

    def h0(path, g):
        m = g.mean(axis=_common.normalize_axis(axis, g.ndim, path), keepdims=True)
        return m + (g - m) / (H0_DEFAULT_LAM if lam is None else lam)

    def sobolev(path, g):
        ax = _common.normalize_axis(axis, g.ndim, path)
        n = g.shape[ax]
        if n == 1:
            return g
        m = g.mean(axis=ax, keepdims=True)
        spectrum = jnp.fft.rfft(g - m, axis=ax)
        shape = [1] * g.ndim
        shape[ax] = n // 2 + 1
        gains = jnp.reshape(_sobolev_gains(n, lam, g.dtype), shape)
        u = jnp.fft.irfft(spectrum * gains, n=n, axis=ax)
        return m + u

    smooth = h0 if metric == "h0" else sobolev

    def update_fn(updates, state, params=None):
        del params
        return _common.map_float_leaves(smooth, updates, min_ndim=min_ndim), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
