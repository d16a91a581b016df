"""gcgd_jax: gradient corrections for JAX / Optax.

Where things are, by what they are:

* :mod:`gcgd_jax.transforms` -- optax transforms to chain before any optimizer
  (``gc_w``, ``gc_w_v2``, ``centralize``, ``channel_directed``, ``znorm``,
  ``agr``, ``mars_correction``, ``grokfast_ema``; for continual learning, fed the old
  tasks' gradients: ``layerwise_gradient_decomposition``, ``gem``, ``agem``);
* :mod:`gcgd_jax.losses` -- losses (``powergrad_cross_entropy``);
* :mod:`gcgd_jax.gradients` -- ``value_and_grad`` replacements
  (``gradient_norm_penalty``);
* :mod:`gcgd_jax.estimators` -- gradient estimates from forward-mode passes only
  (``weight_perturbation``, ``activity_perturbation``, ``gradient_guess``);
* :mod:`gcgd_jax.layers` -- graph layers (``backward_grad_norm``);
* :mod:`gcgd_jax.models` -- the Flax NNX ResNets and GC-ODE;
* :mod:`gcgd_jax.methods` -- the registry of every method above;
* :mod:`gcgd_jax.ops` -- the operations that make XLA's CPU backend fast;
* :mod:`gcgd_jax.train` and :mod:`gcgd_jax.data` -- the training system;
* :mod:`gcgd_jax.continual` -- continual learning: task sequences, episodic memories,
  GEM's metrics and their runner (``gcgd-continual``).

Every public name below is importable from ``gcgd_jax`` directly; the
sub-packages are imported on first use, so ``import gcgd_jax`` itself is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcgd_jax._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "GCWState",
            "GCWv2State",
            "GrokfastEMAState",
            "MarsCorrectionState",
            "agem",
            "agr",
            "centralize",
            "channel_directed",
            "gc_w",
            "gc_w_memory_floats",
            "gc_w_predictor_loss",
            "gc_w_states",
            "gc_w_v2",
            "gc_w_v2_effective_filter",
            "gc_w_v2_memory_floats",
            "gc_w_v2_states",
            "gem",
            "grokfast_ema",
            "layerwise_gradient_decomposition",
            "mars_correction",
            "znorm",
        ),
        "gcgd_jax.transforms",
    ),
    "powergrad_cross_entropy": "gcgd_jax.losses",
    "gradient_norm_penalty": "gcgd_jax.gradients",
    **dict.fromkeys(
        ("Credited", "activity_perturbation", "gradient_guess", "weight_perturbation"),
        "gcgd_jax.estimators",
    ),
    "BackwardGradNorm": "gcgd_jax.layers",
    "backward_grad_norm": "gcgd_jax.layers",
    "GCODE": "gcgd_jax.models",
    "GCODEConfig": "gcgd_jax.models",
}
_SUBMODULES = (
    "continual",
    "data",
    "estimators",
    "gradients",
    "layers",
    "losses",
    "methods",
    "models",
    "ops",
    "train",
    "transforms",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)


if TYPE_CHECKING:  # static analysers see the eager imports
    from gcgd_jax import (
        continual,
        data,
        estimators,
        gradients,
        layers,
        losses,
        methods,
        models,
        ops,
        train,
        transforms,
    )
    from gcgd_jax.estimators import (
        Credited,
        activity_perturbation,
        gradient_guess,
        weight_perturbation,
    )
    from gcgd_jax.gradients import gradient_norm_penalty
    from gcgd_jax.layers import BackwardGradNorm, backward_grad_norm
    from gcgd_jax.losses import powergrad_cross_entropy
    from gcgd_jax.models import GCODE, GCODEConfig
    from gcgd_jax.transforms import (
        GCWState,
        GCWv2State,
        GrokfastEMAState,
        MarsCorrectionState,
        agem,
        agr,
        centralize,
        channel_directed,
        gc_w,
        gc_w_memory_floats,
        gc_w_predictor_loss,
        gc_w_states,
        gc_w_v2,
        gc_w_v2_effective_filter,
        gc_w_v2_memory_floats,
        gc_w_v2_states,
        gem,
        grokfast_ema,
        layerwise_gradient_decomposition,
        mars_correction,
        znorm,
    )
