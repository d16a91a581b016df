"""Losses that correct the gradient through the loss itself (not optax transforms)."""

from gcgd_jax.losses.powergrad import powergrad_cross_entropy

__all__ = ["powergrad_cross_entropy"]
