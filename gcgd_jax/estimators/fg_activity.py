"""Activity perturbation (FG-A): the forward gradient through the pre-activations."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gcgd_jax.estimators import _common
from gcgd_jax.estimators.protocol import PerturbedLoss, check_perturbable

__all__ = ["activity_perturbation"]

# A guess sampler: (key, the unperturbed forward pass or its shapes, the model and the
# batch) -> tap -> a direction shaped like the tap's pre-activation (float32 at least).
GuessSampler = Callable[[jax.Array, PerturbedLoss, Any, tuple, dict], dict[str, jax.Array]]


def normal_guess(
    key: jax.Array, primal: PerturbedLoss, model: Any, args: tuple, kwargs: dict
) -> dict[str, jax.Array]:
    """u ~ N(0, I) at every tap."""
    return _common.normal_like(key, dict(primal.preactivations))


def activity_estimate(
    model: Any,
    args: tuple,
    kwargs: dict,
    key: jax.Array,
    *,
    num_directions: int,
    sample: GuessSampler,
    mask_inactive: bool,
    needs_primal: bool,
) -> tuple[jax.Array, Any]:
    """The engine shared by activity perturbation and the activity-space guesses.

    One forward ``jax.jvp`` per direction (vmapped), with the direction ``u`` added
    to the taps' pre-activations; per tap, ``g_z = mean_k(d(credits)_k * u_k)``
    (times the active mask); then the weight estimate is the VJP of the model's
    layer-local function at ``g_z`` (plus the exact gradient of its local loss).
    """
    check_perturbable(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(perturbation: Mapping[str, jax.Array] | None) -> PerturbedLoss:
        return model.perturbed_loss(*args, perturbation=perturbation, **kwargs)

    # the structured guesses are built from the unperturbed activations; others need shapes
    primal = forward(None) if needs_primal else jax.eval_shape(forward, None)
    zeros = {n: jnp.zeros(z.shape, z.dtype) for n, z in primal.preactivations.items()}

    def credits_and_out(u: Mapping[str, jax.Array]) -> tuple[Any, PerturbedLoss]:
        out = forward(u)
        return dict(out.credits), out

    def one_direction(k: jax.Array) -> tuple[dict[str, jax.Array], PerturbedLoss]:
        guess = sample(k, primal, model, args, kwargs)
        tangents = {n: guess[n].astype(zeros[n].dtype) for n in zeros}
        _, d, out = jax.jvp(credits_and_out, (zeros,), (tangents,), has_aux=True)
        g_z = {
            n: jnp.broadcast_to(d[n].astype(guess[n].dtype), guess[n].shape) * guess[n]
            for n in zeros
        }
        return g_z, out

    keys = jax.random.split(key, num_directions)
    g_z, out = jax.vmap(one_direction, out_axes=(0, None))(keys)
    g_z = {n: jnp.mean(g, axis=0) for n, g in g_z.items()}
    if mask_inactive:
        g_z = {n: jnp.where(out.active[n], g, jnp.zeros_like(g)) for n, g in g_z.items()}

    def local(p: Any) -> tuple[Mapping[str, jax.Array], jax.Array]:
        local_pass = nnx.merge(graphdef, p, rest).local_pass(out.record, *args, **kwargs)
        return dict(local_pass.preactivations), local_pass.loss

    (pre, local_loss), vjp_fn = jax.vjp(local, params)
    cotangent = ({n: g_z[n].astype(pre[n].dtype) for n in pre}, jnp.ones_like(local_loss))
    (grads,) = vjp_fn(cotangent)
    return out.loss, _common.cast_like(grads, params)


def activity_perturbation(
    num_directions: int = 1, *, mask_inactive: bool = True
) -> Callable[..., tuple[jax.Array, Any]]:
    r"""Forward gradient by activity perturbation (FG-A).

    Each tapped pre-activation :math:`z` (per example; per patch and group in
    a LocalMixer) is perturbed by :math:`u \sim \mathcal N(0, I)`. One forward
    ``jax.jvp`` gives every credited loss term's directional derivative
    :math:`d = \nabla_z c \cdot u` at once, and for a linear layer
    :math:`z = x W + b` with input :math:`x`

    .. math::

        \hat g_z = \frac{1}{K}\sum_{k} d_k\, u_k \odot m, \qquad
        \hat g_W = x^\top \hat g_z, \qquad \hat g_b = \textstyle\sum \hat g_z,

    where :math:`m` is 1 on units whose ReLU is active and 0 elsewhere (their
    true gradient is zero: Ren et al. do not perturb them). :math:`\hat g_W`
    is computed as the VJP of the layer's own function at its recorded input,
    a reverse pass through that one layer (and the parameter-free LayerNorm
    between it and the perturbation point, as the official code does), never
    through the network. Parameters trained by exact local gradients (the
    model's ``local_pass`` loss, e.g. the LocalMixer's linear heads) get them;
    parameters that no tap reaches get zero.

    :math:`\hat g` is unbiased when each unit's credit is the only loss term
    that depends on it (per example; per patch and group behind the local
    losses' stop-gradients). For one dense layer and one example with fan-in
    :math:`p` and :math:`q` outputs, FG-A's total variance is
    :math:`(q + 1)\lVert g \rVert^2` against FG-W's :math:`(pq + 1)\lVert g
    \rVert^2` (Ren et al., Table 1): about :math:`p` times less.

    Which pre-activations are tapped, and which loss terms credit them, is the
    model's choice (:class:`~gcgd_jax.estimators.ActivityPerturbable`); the
    local losses of :class:`~gcgd_jax.models.LocalMixer` give LG-FG-A.

    Cost: :math:`K` forward-mode passes (vmapped) plus one layer-local VJP; the
    K directions are averaged before it. The estimate's scale is that of the
    gradient of the model's ``loss`` (a batch mean), not of a batch sum.

    Args:
        num_directions: :math:`K \ge 1`, directions averaged (static).
        mask_inactive: zero the estimate on inactive ReLU units (Ren et al.).
            ``False`` keeps the plain :math:`d\,u` there (still unbiased, more
            variance). Static.

    Returns:
        ``estimate(model, *args, key, **kwargs)`` returning ``(loss, grads)``:
        the unperturbed loss and the estimate, with the structure and dtypes of
        ``nnx.state(model, nnx.Param)``. ``args`` are the model's batch (e.g.
        ``x, labels``); ``key`` is a PRNG key (keyword-only). It can be called
        inside ``jax.jit`` on a merged model.

    Raises:
        ValueError: if ``num_directions`` < 1.
        TypeError: if ``num_directions`` is not an int; when called, if the model
            is not :class:`~gcgd_jax.estimators.ActivityPerturbable`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from gcgd_jax.estimators import activity_perturbation
        >>> from gcgd_jax.models import MLP
        >>> graphdef, params = nnx.split(MLP(784, (64,), 10, rngs=nnx.Rngs(0)), nnx.Param)
        >>> estimate = activity_perturbation(num_directions=4)
        >>> @jax.jit
        ... def step(params, x, y, key):
        ...     return estimate(nnx.merge(graphdef, params), x, y, key=key)
        >>> x, y = jnp.ones((8, 28, 28, 1)), jnp.zeros((8,), jnp.int32)
        >>> loss, grads = step(params, x, y, jax.random.key(0))
        >>> grads["layers"][0]["kernel"].shape
        (784, 64)

    References:
        Ren, Kornblith, Liao and Hinton, `Scaling Forward Gradient With Local
        Losses <https://arxiv.org/abs/2210.03310>`_, ICLR 2023
    """
    num_directions = _common.check_num_directions(num_directions)

    def estimate(model: Any, *args: Any, key: jax.Array, **kwargs: Any) -> tuple[jax.Array, Any]:
        return activity_estimate(
            model,
            args,
            kwargs,
            key,
            num_directions=num_directions,
            sample=normal_guess,
            mask_inactive=mask_inactive,
            needs_primal=False,
        )

    return estimate
