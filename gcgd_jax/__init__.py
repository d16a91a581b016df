"""gcgd_jax: gradient corrections for JAX / Optax."""

__version__ = "0.1.0"
