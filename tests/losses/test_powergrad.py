"""PowerGrad cross-entropy against hand-written NumPy formulas (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcgd_jax.losses.powergrad import powergrad_cross_entropy


def _np_probs(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_cross_entropy(z, y):
    p = _np_probs(z)
    return -np.log(np.take_along_axis(p, np.asarray(y)[..., None], axis=-1)[..., 0])


def _np_powergrad_grad(z, y, alpha, cotangent):
    """d(sum cotangent * loss)/dz = cotangent * (p**alpha / sum p**alpha - onehot)."""
    p = _np_probs(z) ** alpha
    p_alpha = p / p.sum(axis=-1, keepdims=True)
    onehot = np.eye(np.shape(z)[-1])[np.asarray(y)]
    return np.asarray(cotangent, np.float64)[..., None] * (p_alpha - onehot)


def _data(shape=(16, 7), seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
    return logits, labels


def _mean_grad(logits, labels, alpha):
    return jax.grad(lambda z: powergrad_cross_entropy(z, labels, alpha).mean())(logits)


@pytest.mark.parametrize("shape", [(16, 7), (2, 3, 5), (4,)])
def test_forward_is_cross_entropy(shape):
    logits, labels = _data(shape)
    loss = powergrad_cross_entropy(logits, labels, 0.3)
    assert loss.shape == shape[:-1]
    np.testing.assert_allclose(loss, _np_cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        loss, optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    )


@pytest.mark.parametrize("alpha", [1, 1.0, jnp.array(1.0)])
def test_alpha_one_is_the_ordinary_gradient_exactly(alpha):
    logits, labels = _data()

    def ordinary(z):
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

    np.testing.assert_array_equal(_mean_grad(logits, labels, alpha), jax.grad(ordinary)(logits))
    jitted = jax.jit(jax.grad(lambda z, a: powergrad_cross_entropy(z, labels, a).mean()))
    np.testing.assert_array_equal(jitted(logits, alpha), jax.jit(jax.grad(ordinary))(logits))


def test_alpha_zero_is_uniform_minus_onehot():
    logits, labels = _data()
    n, c = logits.shape
    expected = (np.full((n, c), 1.0 / c) - np.eye(c)[np.asarray(labels)]) / n
    np.testing.assert_allclose(_mean_grad(logits, labels, 0.0), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(16, 7), (2, 3, 5)])
def test_intermediate_alpha_matches_numpy(alpha, shape):
    logits, labels = _data(shape, seed=1)
    cotangent = np.random.default_rng(2).standard_normal(shape[:-1]).astype(np.float32)
    grad = jax.grad(lambda z: jnp.sum(cotangent * powergrad_cross_entropy(z, labels, alpha)))(
        logits
    )
    expected = _np_powergrad_grad(logits, labels, alpha, cotangent)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_extreme_logits_stay_finite():
    logits = jnp.array([[500.0, -500.0, 0.0], [-80.0, 90.0, 89.0]])
    labels = jnp.array([1, 2])
    grad = _mean_grad(logits, labels, 0.25)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        grad, _np_powergrad_grad(logits, labels, 0.25, [0.5, 0.5]), rtol=1e-5, atol=1e-7
    )


def test_traced_alpha_under_jit():
    logits, labels = _data()
    grad_fn = jax.jit(jax.grad(lambda z, a: powergrad_cross_entropy(z, labels, a).mean()))
    for alpha in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(
            grad_fn(logits, jnp.float32(alpha)),
            _np_powergrad_grad(logits, labels, alpha, np.full(labels.shape, 1 / labels.size)),
            rtol=1e-5,
            atol=1e-7,
        )


def test_vmap_matches_batched():
    logits, labels = _data()

    def per_example(z, y):
        return jax.value_and_grad(lambda z: powergrad_cross_entropy(z, y, 0.3))(z)

    losses, grads = jax.vmap(per_example)(logits, labels)
    batched_grad = jax.grad(lambda z: powergrad_cross_entropy(z, labels, 0.3).sum())(logits)
    np.testing.assert_allclose(losses, powergrad_cross_entropy(logits, labels, 0.3), rtol=1e-6)
    np.testing.assert_allclose(grads, batched_grad, rtol=1e-6, atol=1e-7)


def test_no_gradient_for_alpha():
    logits, labels = _data()
    assert jax.grad(lambda a: powergrad_cross_entropy(logits, labels, a).sum())(0.5) == 0.0


def test_bfloat16_kept():
    logits, labels = _data()
    logits16 = logits.astype(jnp.bfloat16)
    loss = powergrad_cross_entropy(logits16, labels, 0.25)
    grad = jax.grad(lambda z: powergrad_cross_entropy(z, labels, 0.25).sum())(logits16)
    assert loss.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    expected = _np_powergrad_grad(np.asarray(logits16, np.float32), labels, 0.25, np.ones(16))
    np.testing.assert_allclose(np.asarray(grad, np.float32), expected, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), jnp.array(2.0)])
def test_bad_alpha_raises(alpha):
    logits, labels = _data()
    with pytest.raises(ValueError, match="alpha"):
        powergrad_cross_entropy(logits, labels, alpha)


def test_non_scalar_alpha_raises():
    logits, labels = _data()
    with pytest.raises(ValueError, match="alpha"):
        powergrad_cross_entropy(logits, labels, jnp.array([0.5, 0.5]))


def test_bad_labels_and_logits_raise():
    logits, labels = _data()
    with pytest.raises(ValueError, match="labels"):
        powergrad_cross_entropy(logits, labels.astype(jnp.float32), 0.5)
    with pytest.raises(ValueError, match="labels"):
        powergrad_cross_entropy(logits, labels[:-1], 0.5)
    with pytest.raises(ValueError, match="logits"):
        powergrad_cross_entropy(jnp.ones((16, 7), jnp.int32), labels, 0.5)
    with pytest.raises(ValueError, match="logits"):
        powergrad_cross_entropy(jnp.float32(1.0), jnp.int32(0), 0.5)
