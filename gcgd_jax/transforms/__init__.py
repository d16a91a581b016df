"""Gradient corrections as optax ``GradientTransformation`` s, one per module.

Each one is chained before the optimizer it corrects::

    tx = optax.chain(gcgd_jax.transforms.centralize(), optax.sgd(0.1, momentum=0.9))

The continual-learning corrections (``agem``, ``gem``,
``layerwise_gradient_decomposition``) also take the old tasks' gradients as keyword
arguments of ``update`` (``memory_grads``, ``memory_mask``), which ``optax.chain``
forwards.

Corrections that are not optax transforms live where their kind says:
losses in :mod:`gcgd_jax.losses`, ``value_and_grad`` replacements in
:mod:`gcgd_jax.gradients`, graph layers in :mod:`gcgd_jax.layers`, GC-ODE in
:mod:`gcgd_jax.models`.
"""

from gcgd_jax.transforms.agem import agem
from gcgd_jax.transforms.agr import agr
from gcgd_jax.transforms.centralize import centralize
from gcgd_jax.transforms.channel_directed import channel_directed
from gcgd_jax.transforms.gc_w import (
    GCWState,
    gc_w,
    gc_w_memory_floats,
    gc_w_predictor_loss,
    gc_w_states,
)
from gcgd_jax.transforms.gc_w_v2 import (
    GCWv2State,
    gc_w_v2,
    gc_w_v2_effective_filter,
    gc_w_v2_memory_floats,
    gc_w_v2_states,
)
from gcgd_jax.transforms.gem import gem
from gcgd_jax.transforms.grokfast_ema import GrokfastEMAState, grokfast_ema
from gcgd_jax.transforms.layerwise_decomposition import layerwise_gradient_decomposition
from gcgd_jax.transforms.mars_correction import MarsCorrectionState, mars_correction
from gcgd_jax.transforms.znorm import znorm

__all__ = [
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
]
