"""Gradient estimators from forward-mode differentiation: no reverse pass through the
network.

Each returns a gradient-shaped estimate (the parameters' structure and dtypes)
from a loss, the parameters and a PRNG key, averaging ``num_directions``
vmapped ``jax.jvp`` passes:

* :func:`weight_perturbation` -- FG-W, :math:`(\\nabla L \\cdot v)\\, v` with
  :math:`v \\sim \\mathcal N(0, I)` over all weights; any params tree and loss
  (local credits through :class:`Credited`);
* :func:`activity_perturbation` -- FG-A, perturbing pre-activations per example
  (Ren et al.); on models that expose them (:class:`ActivityPerturbable`:
  :class:`gcgd_jax.models.MLP`, :class:`gcgd_jax.models.LocalMixer`);
* :func:`gradient_guess` -- Singhal et al.'s guess families (isotropic,
  activation perturbation, "Wᵀ", activation mixing; the last two biased).

:func:`cosine_similarity` measures an estimate against the gradient;
:func:`check_perturbable` validates a model (class or instance) for an
activity estimator before anything is built (it needs no JAX).

Calling conventions, all jit-safe (``num_directions`` and the options are static,
``key`` is a traced PRNG key)::

    # FG-W: like jax.value_and_grad of a loss of the parameters
    value, grads = weight_perturbation(loss_fn, K)(params, *batch, key=key)
    # FG-A and the guesses: the model itself (an nnx.Module merged inside the
    # jitted step) and its batch; grads is shaped like nnx.state(model, nnx.Param)
    loss, grads = activity_perturbation(K)(model, x, labels, key=key)
    loss, grads = gradient_guess("transpose", K)(model, x, labels, key=key)

The estimate goes into any optax chain like a gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcgd_jax._lazy import lazy_exports

# public name -> the module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "Credited": "gcgd_jax.estimators.fg_weight",
    "weight_perturbation": "gcgd_jax.estimators.fg_weight",
    "activity_perturbation": "gcgd_jax.estimators.fg_activity",
    "GUESS_FAMILIES": "gcgd_jax.estimators.guesses",
    "GuessFamily": "gcgd_jax.estimators.guesses",
    "gradient_guess": "gcgd_jax.estimators.guesses",
    "ActivityPerturbable": "gcgd_jax.estimators.protocol",
    "LocalPass": "gcgd_jax.estimators.protocol",
    "PerturbedLoss": "gcgd_jax.estimators.protocol",
    "check_perturbable": "gcgd_jax.estimators.protocol",
    "cosine_similarity": "gcgd_jax.estimators.metrics",
}
__all__ = [
    "GUESS_FAMILIES",
    "ActivityPerturbable",
    "Credited",
    "GuessFamily",
    "LocalPass",
    "PerturbedLoss",
    "activity_perturbation",
    "check_perturbable",
    "cosine_similarity",
    "gradient_guess",
    "weight_perturbation",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # static analysers see the eager imports
    from gcgd_jax.estimators.fg_activity import activity_perturbation
    from gcgd_jax.estimators.fg_weight import Credited, weight_perturbation
    from gcgd_jax.estimators.guesses import GUESS_FAMILIES, GuessFamily, gradient_guess
    from gcgd_jax.estimators.metrics import cosine_similarity
    from gcgd_jax.estimators.protocol import (
        ActivityPerturbable,
        LocalPass,
        PerturbedLoss,
        check_perturbable,
    )
