"""Gradient corrections: optax transforms and loss/graph-level corrections."""

from gcgd_jax.transforms.agr import agr
from gcgd_jax.transforms.backward_grad_norm import BackwardGradNorm, backward_grad_norm
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
from gcgd_jax.transforms.gradient_norm_penalty import gradient_norm_penalty
from gcgd_jax.transforms.grokfast_ema import GrokfastEMAState, grokfast_ema
from gcgd_jax.transforms.mars_correction import MarsCorrectionState, mars_correction
from gcgd_jax.transforms.powergrad import powergrad_cross_entropy
from gcgd_jax.transforms.znorm import znorm

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
    "BackwardGradNorm",
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
    "powergrad_cross_entropy",
    "znorm",
]
