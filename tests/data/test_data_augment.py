"""On-device augmentation (crop + flip) and normalisation, against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.data import augment


def _images(n=16, h=8, w=8, c=3, dtype=np.uint8, seed=0):
    x = np.random.default_rng(seed).integers(1, 256, size=(n, h, w, c))
    return x.astype(dtype)


def _reference(images, offsets, flips, pad):
    """NumPy: zero-pad, crop at offsets, mirror where flips; one image at a time."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    for i in range(n):
        r, c = offsets[i]
        crop = padded[i, r : r + h, c : c + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_random_crop_flip_matches_numpy_reference(dtype):
    images = _images(dtype=dtype)
    key = jax.random.key(42)
    out = augment.random_crop_flip(key, jnp.asarray(images), pad=4)
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets, flips = augment.crop_flip_params(key, len(images), 4)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert offsets.shape == (16, 2) and offsets.min() >= 0 and offsets.max() <= 8
    np.testing.assert_array_equal(np.asarray(out), _reference(images, offsets, flips, 4))


def test_each_output_is_some_crop_and_flip_of_its_input():
    """Independent of crop_flip_params: brute force over every window and flip."""
    images = _images(n=6, h=6, w=5, c=2)
    out = np.asarray(augment.random_crop_flip(jax.random.key(7), jnp.asarray(images), pad=2))
    for i in range(len(images)):
        candidates = [
            _reference(images[i : i + 1], [(r, c)], [f], 2)[0]
            for r in range(5)
            for c in range(5)
            for f in (False, True)
        ]
        assert any(np.array_equal(out[i], cand) for cand in candidates)


def test_draws_cover_the_range_and_vary_with_the_key():
    offsets, flips = augment.crop_flip_params(jax.random.key(0), 4000, 4)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    assert set(np.unique(offsets)) == set(range(9))
    assert 0.45 < flips.mean() < 0.55
    a = augment.random_crop_flip(jax.random.key(1), jnp.asarray(_images()))
    b = augment.random_crop_flip(jax.random.key(2), jnp.asarray(_images()))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_works_under_jit_and_pad_zero_only_flips():
    images = jnp.asarray(_images())
    key = jax.random.key(3)
    jitted = jax.jit(augment.random_crop_flip, static_argnames="pad")
    np.testing.assert_array_equal(
        np.asarray(jitted(key, images, pad=4)), np.asarray(augment.random_crop_flip(key, images))
    )
    out = np.asarray(jax.jit(lambda k, x: augment.random_crop_flip(k, x, pad=0))(key, images))
    _, flips = augment.crop_flip_params(key, len(images), 0)
    expected = np.where(np.asarray(flips)[:, None, None, None], np.asarray(images)[:, :, ::-1],
                        np.asarray(images))  # fmt: skip
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="NHWC"):
        augment.random_crop_flip(key, images[0])
    with pytest.raises(ValueError, match="pad"):
        augment.random_crop_flip(key, images, pad=-1)


def test_normalize():
    images = _images(n=2, c=3)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    out = jax.jit(augment.normalize)(jnp.asarray(images), mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    floats = augment.normalize(jnp.asarray(images, jnp.float32) / 255, mean, std)
    np.testing.assert_allclose(np.asarray(floats), np.asarray(out), rtol=1e-5, atol=1e-5)
