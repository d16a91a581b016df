"""Graph modules: Flax NNX layers placed inside a model to change its backward pass."""

from gcgd_jax.layers.backward_grad_norm import BackwardGradNorm, backward_grad_norm

__all__ = ["BackwardGradNorm", "backward_grad_norm"]
