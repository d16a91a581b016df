"""On-device augmentation and normalisation: pure ``jnp`` functions for the jitted step.

Example::

  def train_step(state, images_u8, labels, key):
      images = augment.random_crop_flip(key, images_u8, pad=4)
      x = augment.normalize(images, *data.normalization("cifar10"))
      ...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["crop_flip", "crop_flip_params", "normalize", "random_crop_flip"]


def _check(images, pad) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected a batch of NHWC images, got shape {images.shape}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative Python int (static), got {pad!r}")


def crop_flip_params(key: jax.Array, num_images: int, pad: int = 4) -> tuple[jax.Array, jax.Array]:
    """The random draws of `random_crop_flip`.

    Returns:
      ``offsets``: ``(num_images, 2)`` int32, the (row, column) of each crop's
      top-left corner in the padded image, uniform in ``[0, 2 * pad]``;
      ``flips``: ``(num_images,)`` bool, True with probability 1/2.
    """
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (num_images, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(k_flip, 0.5, (num_images,))
    return offsets, flips


def crop_flip(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, *, pad: int = 4
) -> jax.Array:
    """Zero-pads by ``pad``, crops back to ``H x W`` at ``offsets``, then mirrors where ``flips``."""
    _check(images, pad)
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crops = jax.vmap(lambda im, o: lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets
    )
    return jnp.where(flips[:, None, None, None], crops[:, :, ::-1, :], crops)


def random_crop_flip(key: jax.Array, images: jax.Array, *, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation: pad-``pad`` random crop and random horizontal flip.

    Each image is zero-padded by ``pad`` pixels on every side, a random
    ``H x W`` window is cut from it (offsets uniform in ``[0, 2 pad]``, per
    image), and it is mirrored left-right with probability 1/2. Vectorised over
    the batch (no Python loop); works under ``jax.jit`` (``pad`` is static).

    Args:
      key: a PRNG key; the same key gives the same augmentation.
      images: ``(N, H, W, C)`` batch, any dtype (uint8 or float); kept.

    Returns:
      The augmented batch, same shape and dtype.
    """
    _check(images, pad)
    offsets, flips = crop_flip_params(key, images.shape[0], pad)
    return crop_flip(images, offsets, flips, pad=pad)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """``(images / 255 - mean) / std`` as float32, per channel (last axis).

    Integer images are scaled by 1/255 first; floating images are taken to be
    on the [0, 1] scale already. ``mean``/``std`` as from
    `gcgd_jax.data.normalization`.
    """
    x = jnp.asarray(images)
    scale = 1.0 / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else 1.0
    x = x.astype(jnp.float32) * scale
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
