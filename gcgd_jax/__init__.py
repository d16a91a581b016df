"""gcgd_jax: gradient corrections for JAX / Optax.

Optax transforms to chain before any optimizer (``gc_w``, ``centralize``,
``channel_directed``, ``znorm``, ``agr``), loss- and graph-level corrections
(``powergrad_cross_entropy``, ``backward_grad_norm``, ``gradient_norm_penalty``),
and the GC-ODE hidden-state correction for the Flax NNX ResNets in
:mod:`gcgd_jax.models`. The training system lives in :mod:`gcgd_jax.train`
and the data sets in :mod:`gcgd_jax.data` (imported on demand).
"""

from gcgd_jax import models
from gcgd_jax.models import GCODE, GCODEConfig
from gcgd_jax.transforms import (
    BackwardGradNorm,
    GCWState,
    agr,
    backward_grad_norm,
    centralize,
    channel_directed,
    gc_w,
    gc_w_memory_floats,
    gc_w_predictor_loss,
    gc_w_states,
    gradient_norm_penalty,
    powergrad_cross_entropy,
    znorm,
)
from gcgd_jax.transforms import (
    GCWv2State,
    GrokfastEMAState,
    MarsCorrectionState,
    gc_w_v2,
    gc_w_v2_effective_filter,
    gc_w_v2_memory_floats,
    gc_w_v2_states,
    grokfast_ema,
    mars_correction,
)

__version__ = "0.1.0"

__all__ = [
    "mars_correction",
    "grokfast_ema",
    "gc_w_v2_states",
    "gc_w_v2_memory_floats",
    "gc_w_v2_effective_filter",
    "gc_w_v2",
    "MarsCorrectionState",
    "GrokfastEMAState",
    "GCWv2State",
    "GCODE",
    "BackwardGradNorm",
    "GCODEConfig",
    "GCWState",
    "agr",
    "backward_grad_norm",
    "centralize",
    "channel_directed",
    "gc_w",
    "gc_w_memory_floats",
    "gc_w_predictor_loss",
    "gc_w_states",
    "gradient_norm_penalty",
    "models",
    "powergrad_cross_entropy",
    "znorm",
]
