"""How a model exposes its pre-activations to the activity-space estimators.

Activity perturbation (Ren et al.) and the structured gradient guesses
(Singhal et al.) perturb a network's *pre-activations* rather than its
weights, so they need three things from the model, which this module names:

* a forward pass that adds a caller-given perturbation to chosen
  pre-activations ("taps") and returns, per tap, the loss terms that the
  tap's units are credited with (:meth:`ActivityPerturbable.perturbed_loss`,
  returning :class:`PerturbedLoss`); ``jax.jvp`` of those credits with respect
  to the perturbation gives every directional derivative in one forward pass;
* the layer-local function of each tap: its pre-activation recomputed from its
  recorded input with the module's parameters
  (:meth:`ActivityPerturbable.local_pass`, returning :class:`LocalPass`).
  The weight estimate is this function's VJP, a reverse pass through one
  linear layer (and the parameter-free normalisation right after it), never
  through the network;
* for the guesses that use the next layer's weights or its inputs ("Wᵀ",
  activation mixing), which tap reads which tap's output (``downstream``).

:class:`gcgd_jax.models.MLP` and :class:`gcgd_jax.models.LocalMixer` implement
it; :func:`check_perturbable` says, before any data is loaded, whether a model
(class or instance) can be used with a given estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: validating a model class needs no JAX
    import jax

__all__ = [
    "ActivityPerturbable",
    "LocalPass",
    "PerturbedLoss",
    "check_perturbable",
]


class PerturbedLoss(NamedTuple):
    """What :meth:`ActivityPerturbable.perturbed_loss` returns.

    Every dict is keyed by tap name (the same names as the perturbation).
    """

    loss: jax.Array  # () float: the objective whose gradient is estimated.
    # tap -> the loss terms the tap's units are credited with, broadcastable to
    # the tap's pre-activation: per example (MLP: ``loss_b / B`` of shape (B, 1)),
    # or per example, patch and group (LocalMixer's local losses). Unit i's
    # credit c must satisfy d(loss)/dz_i = d(c)/dz_i, i.e. no other loss term
    # depends on z_i; the estimators are unbiased under that condition.
    credits: Mapping[str, jax.Array]
    # tap -> the pre-activation at the perturbation point (perturbation included).
    preactivations: Mapping[str, jax.Array]
    # tap -> bool, the pre-activation's shape: units whose ReLU passes (all True
    # where no ReLU follows). Activity perturbation does not perturb the others.
    active: Mapping[str, jax.Array]
    # Arrays the local pass reads: each tap's input under its tap name, plus any
    # other inputs of locally trained parts (e.g. the features of a linear head).
    record: Mapping[str, jax.Array]


class LocalPass(NamedTuple):
    """What :meth:`ActivityPerturbable.local_pass` returns."""

    # tap -> the pre-activation recomputed from ``record[tap]`` with the module's
    # parameters (the layer's own linear map and any parameter-free
    # normalisation before the perturbation point).
    preactivations: Mapping[str, jax.Array]
    # () float: the loss of the parameters trained by exact local gradients
    # (e.g. linear read-out heads on recorded, stop-gradient features); 0 if none.
    loss: jax.Array


@runtime_checkable
class ActivityPerturbable(Protocol):
    """A model whose pre-activations the activity-space estimators can perturb.

    ``perturbed_loss(*args, perturbation=None, **kwargs)`` runs the model on
    its batch (``args``, e.g. ``(x, labels)``), adding ``perturbation[tap]``
    to each tap's pre-activation (``None``: no perturbation), and returns a
    :class:`PerturbedLoss`. ``local_pass(record, *args, **kwargs)`` returns a
    :class:`LocalPass` computed from ``record`` and the parameters only.

    Optional: ``downstream()`` returns ``{tap: next_tap}`` where
    ``record[next_tap]`` is the elementwise ReLU of ``tap``'s pre-activation,
    with the same shape (needed by the "Wᵀ" and activation-mixing guesses).
    The batch axis is axis 0 of every pre-activation and record entry.
    """

    def perturbed_loss(
        self, *args: Any, perturbation: Mapping[str, jax.Array] | None = None, **kwargs: Any
    ) -> PerturbedLoss: ...

    def local_pass(
        self, record: Mapping[str, jax.Array], *args: Any, **kwargs: Any
    ) -> LocalPass: ...


def check_perturbable(model: Any, *, downstream: bool = False) -> None:
    """Raise a ``TypeError`` naming what ``model`` lacks for an activity estimator.

    Args:
        model: an instance or a class (checking a class needs no parameters, so
            a configuration can be validated before anything is built).
        downstream: also require ``downstream()`` (the "Wᵀ" and
            activation-mixing guesses).

    Raises:
        TypeError: if a required method is missing.

    Example:
        >>> from gcgd_jax.estimators import check_perturbable
        >>> from gcgd_jax.models import MLP, ResNet
        >>> check_perturbable(MLP, downstream=True)
        >>> check_perturbable(ResNet)
        Traceback (most recent call last):
        ...
        TypeError: ResNet cannot be used with an activity-perturbation estimator: it has no perturbed_loss, local_pass (see gcgd_jax.estimators.ActivityPerturbable).
    """
    required = ["perturbed_loss", "local_pass"] + (["downstream"] if downstream else [])
    missing = [name for name in required if not callable(getattr(model, name, None))]
    if missing:
        name = model.__name__ if isinstance(model, type) else type(model).__name__
        raise TypeError(
            f"{name} cannot be used with an activity-perturbation estimator: it has no "
            f"{', '.join(missing)} (see gcgd_jax.estimators.ActivityPerturbable)."
        )
