"""Gradient functions: drop-in replacements of ``jax.value_and_grad`` that change
which gradient the optimizer receives."""

from gcgd_jax.gradients.gradient_norm_penalty import gradient_norm_penalty

__all__ = ["gradient_norm_penalty"]
