"""Backward gradient normalization against a NumPy reference of the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.layers.backward_grad_norm import BackwardGradNorm, backward_grad_norm


def _np_normalise(g, axes, eps=1e-6):
    g = np.asarray(g, np.float64)
    n = np.prod([g.shape[a] for a in axes])
    norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    return np.sqrt(n) * g / (norm + eps)


def _grad_through(x, cotangent, **kwargs):
    """The gradient arriving at x when ``cotangent`` arrives at the output."""
    return jax.grad(lambda x: jnp.sum(cotangent * backward_grad_norm(x, **kwargs)))(x)


def _random(shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_forward_is_identity():
    for dtype in (jnp.float32, jnp.bfloat16):
        x = _random((4, 3, 5)).astype(dtype)
        y = backward_grad_norm(x)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, x)


def test_per_sample_gradient_has_norm_sqrt_n():
    x = _random((5, 3, 4))
    # Samples on very different scales.
    cotangent = _random((5, 3, 4), seed=1) * jnp.array([1e-4, 0.1, 1.0, 10.0, 1e3])[:, None, None]
    grad = _grad_through(x, cotangent)
    np.testing.assert_allclose(grad, _np_normalise(cotangent, (1, 2)), rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(np.asarray(grad).reshape(5, -1), axis=1)
    np.testing.assert_allclose(norms[1:], np.sqrt(12.0), rtol=1e-5)
    # Only a gradient norm near eps (3e-4 vs 1e-6) falls visibly short of sqrt(n).
    c_norm = np.linalg.norm(np.asarray(cotangent[0], np.float64))
    np.testing.assert_allclose(norms[0], np.sqrt(12.0) * c_norm / (c_norm + 1e-6), rtol=1e-5)


def test_zero_gradient_stays_zero():
    x = _random((3, 6))
    cotangent = _random((3, 6), seed=1).at[1].set(0.0)
    grad = np.asarray(_grad_through(x, cotangent))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_allclose(grad, _np_normalise(cotangent, (1,)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("axes", "np_axes"), [((0, 2), (0, 2)), (-1, (2,)), ([1], (1,))])
def test_custom_axes(axes, np_axes):
    x = _random((3, 4, 5))
    cotangent = _random((3, 4, 5), seed=2)
    grad = _grad_through(x, cotangent, axes=axes, eps=1e-3)
    np.testing.assert_allclose(
        grad, _np_normalise(cotangent, np_axes, eps=1e-3), rtol=1e-5, atol=1e-6
    )


def test_jit_and_vmap():
    x = _random((2, 3, 4))
    cotangent = _random((2, 3, 4), seed=3)
    grad_fn = jax.jit(jax.grad(lambda x, eps: jnp.sum(cotangent * backward_grad_norm(x, eps=eps))))
    np.testing.assert_allclose(
        grad_fn(x, 1e-6), _np_normalise(cotangent, (1, 2)), rtol=1e-5, atol=1e-6
    )
    # Under vmap over axis 0, every (i, j) row of the last axis is one sample.
    vmapped = jax.vmap(_grad_through)(x, cotangent)
    np.testing.assert_allclose(vmapped, _np_normalise(cotangent, (2,)), rtol=1e-5, atol=1e-6)


def test_bfloat16_gradient_kept():
    x = _random((4, 8)).astype(jnp.bfloat16)
    cotangent = _random((4, 8), seed=4, scale=100.0).astype(jnp.bfloat16)
    grad = _grad_through(x, cotangent)
    assert grad.dtype == jnp.bfloat16
    expected = _np_normalise(np.asarray(cotangent, np.float32), (1,))
    np.testing.assert_allclose(np.asarray(grad, np.float32), expected, rtol=1e-2, atol=1e-2)


def test_module_inside_nnx_model():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=rngs), BackwardGradNorm(eps=1e-6), nnx.Linear(4, 2, rngs=rngs)
    )
    x = _random((6, 3), seed=5)

    def loss_fn(model):
        return jnp.sum(model(x) ** 2)

    grads = nnx.grad(loss_fn)(model)

    # NumPy: backpropagate by hand, normalising the gradient at the hidden layer.
    w1, b1 = np.asarray(model.layers[0].kernel[...]), np.asarray(model.layers[0].bias[...])
    w2, b2 = np.asarray(model.layers[2].kernel[...]), np.asarray(model.layers[2].bias[...])
    xn = np.asarray(x, np.float64)
    h = xn @ w1 + b1
    g_out = 2 * (h @ w2 + b2)
    g_h = _np_normalise(g_out @ w2.T, (1,))
    np.testing.assert_allclose(grads.layers[0].kernel[...], xn.T @ g_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.layers[0].bias[...], g_h.sum(0), rtol=1e-4, atol=1e-5)
    # The layer after it sees the ordinary gradient.
    np.testing.assert_allclose(grads.layers[2].kernel[...], h.T @ g_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "kwargs", "name"),
    [
        ((3, 4), {"axes": 2}, "axes"),
        ((3, 4), {"axes": (1, -1)}, "axes"),
        ((3, 4), {"axes": "1"}, "axes"),
        ((3, 4), {"axes": True}, "axes"),
        ((), {}, "x"),
        ((3, 4), {"eps": 0.0}, "eps"),
        ((3, 4), {"eps": -1e-6}, "eps"),
    ],
)
def test_bad_input_raises(shape, kwargs, name):
    with pytest.raises(ValueError, match=name):
        backward_grad_norm(jnp.ones(shape), **kwargs)


def test_module_bad_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        BackwardGradNorm(eps=0.0)


def test_resnet_option_keeps_the_forward_and_normalises_block_gradients():
    """``resnet20(backward_grad_norm=True)``: same outputs; the gradient reaching each block
    output has RMS 1 per sample, so the parameter gradients change."""
    import optax
    from flax import nnx

    from gcgd_jax.models import resnet20

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))
    plain = resnet20(10, rngs=nnx.Rngs(0))
    normed = resnet20(10, backward_grad_norm=True, rngs=nnx.Rngs(0))
    assert jnp.array_equal(plain(x), normed(x))

    def loss(m):
        return jnp.sum(m(x) ** 2)

    g_plain, g_normed = nnx.grad(loss)(plain), nnx.grad(loss)(normed)
    assert not jnp.allclose(optax.tree.norm(g_plain), optax.tree.norm(g_normed))
    # The head's gradient comes before any normalisation point: unchanged.
    assert jnp.allclose(g_plain["head"]["kernel"][...], g_normed["head"]["kernel"][...])
    with pytest.raises(ValueError, match="backward_grad_norm must be a bool"):
        resnet20(10, backward_grad_norm="yes", rngs=nnx.Rngs(0))
