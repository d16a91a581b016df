"""Gradient-norm penalty against NumPy closed forms and a plain SAM implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from gcgd_jax.gradients.gradient_norm_penalty import gradient_norm_penalty

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((12, 3)), jnp.float32)
Y = jnp.asarray(RNG.standard_normal((12, 2)), jnp.float32)
PARAMS = {
    "w": jnp.asarray(RNG.standard_normal((3, 2)), jnp.float32),
    "b": jnp.asarray(RNG.standard_normal((2,)), jnp.float32),
}


def _mlp_loss(params, x=X, y=Y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _plain_sam_grad(loss_fn, params, radius):
    """SAM's gradient, written directly on the flattened parameter vector."""
    flat, unravel = ravel_pytree(params)
    g = ravel_pytree(jax.grad(loss_fn)(params))[0]
    perturbed = unravel(flat + radius * g / jnp.linalg.norm(g))
    return jax.grad(loss_fn)(perturbed)


def _assert_tree_allclose(actual, expected, **kwargs):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **kwargs), actual, expected)


def test_alpha_zero_is_value_and_grad_exactly():
    value, grads = gradient_norm_penalty(_mlp_loss, radius=0.1, alpha=0.0)(PARAMS)
    ref_value, ref_grads = jax.value_and_grad(_mlp_loss)(PARAMS)
    assert value == ref_value
    jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)


def test_alpha_one_is_sam():
    _, grads = gradient_norm_penalty(_mlp_loss, radius=0.3, alpha=1.0)(PARAMS)
    _assert_tree_allclose(grads, _plain_sam_grad(_mlp_loss, PARAMS, 0.3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.2, 0.8])
def test_intermediate_alpha_is_the_convex_mixture(alpha):
    value, grads = gradient_norm_penalty(_mlp_loss, radius=0.1, alpha=alpha)(PARAMS)
    plain = jax.grad(_mlp_loss)(PARAMS)
    sam = _plain_sam_grad(_mlp_loss, PARAMS, 0.1)
    expected = jax.tree.map(lambda g, s: (1 - alpha) * g + alpha * s, plain, sam)
    _assert_tree_allclose(grads, expected, rtol=1e-5, atol=1e-7)
    assert value == _mlp_loss(PARAMS)  # the unperturbed loss


# A quadratic L = 0.5 (t - c)^T A (t - c): grad A (t - c), Hessian A, so the
# first-order formula is exact: g = A (t - c) + alpha r A grad / |grad|, which is
# also the gradient of L + alpha r |grad L|.
A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
C = np.array([1.0, -2.0, 0.5])


def _quadratic(t):
    d = t - jnp.asarray(C, t.dtype)
    return 0.5 * d @ jnp.asarray(A, t.dtype) @ d


def _np_quadratic_gnp_grad(t, radius, alpha):
    g = A @ (t - C)
    return g + alpha * radius * A @ g / np.linalg.norm(g)


@pytest.mark.parametrize(("radius", "alpha"), [(0.1, 0.8), (0.5, 0.3), (0.05, 1.0)])
def test_quadratic_closed_form(radius, alpha):
    t = np.array([0.3, 0.7, -1.2])
    value, grads = gradient_norm_penalty(_quadratic, radius, alpha)(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(value, 0.5 * (t - C) @ A @ (t - C), rtol=1e-6)
    np.testing.assert_allclose(grads, _np_quadratic_gnp_grad(t, radius, alpha), rtol=1e-5)


def test_quadratic_matches_finite_differences_of_the_penalised_loss():
    radius, alpha = 0.2, 0.6
    t = np.array([0.3, 0.7, -1.2])

    def penalised(t):  # NumPy float64: L + lambda |grad L| with lambda = alpha r
        return 0.5 * (t - C) @ A @ (t - C) + alpha * radius * np.linalg.norm(A @ (t - C))

    h = 1e-6
    fd = np.array([(penalised(t + h * e) - penalised(t - h * e)) / (2 * h) for e in np.eye(3)])
    _, grads = gradient_norm_penalty(_quadratic, radius, alpha)(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(grads, fd, rtol=1e-5)


def test_zero_gradient_gives_no_perturbation_and_no_nan():
    value, grads = gradient_norm_penalty(_quadratic, radius=0.1, alpha=0.8)(jnp.asarray(C))
    assert value == 0.0
    np.testing.assert_array_equal(grads, np.zeros(3))
    # Zero gradient on one leaf only: still finite, and that leaf is not moved.
    _, grads = gradient_norm_penalty(lambda p: jnp.sum(p["a"] ** 2) + 0 * p["z"].sum(), 0.1, 1.0)(
        {"a": jnp.ones(3), "z": jnp.ones(2)}
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(grads["z"], 0.0)


def test_has_aux_comes_from_the_unperturbed_point():
    def loss_with_aux(params):
        pred = X @ params["w"] + params["b"]
        return jnp.mean((pred - Y) ** 2), {"pred": pred}

    (value, aux), grads = gradient_norm_penalty(loss_with_aux, 0.1, 0.5, has_aux=True)(PARAMS)
    np.testing.assert_allclose(aux["pred"], X @ PARAMS["w"] + PARAMS["b"], rtol=1e-6)
    assert value == loss_with_aux(PARAMS)[0]
    plain_loss = lambda p: loss_with_aux(p)[0]
    plain, sam = jax.grad(plain_loss)(PARAMS), _plain_sam_grad(plain_loss, PARAMS, 0.1)
    _assert_tree_allclose(
        grads, jax.tree.map(lambda g, s: 0.5 * g + 0.5 * s, plain, sam), rtol=1e-5, atol=1e-7
    )


def test_argnums_perturbs_all_with_one_global_norm():
    def loss(w, x, b, *, y):
        return _mlp_loss({"w": w, "b": b}, x, y)

    value, (gw, gb) = gradient_norm_penalty(loss, 0.2, 0.7, argnums=(0, 2))(
        PARAMS["w"], X, PARAMS["b"], y=Y
    )
    _, ref = gradient_norm_penalty(_mlp_loss, 0.2, 0.7)(PARAMS)
    assert value == _mlp_loss(PARAMS)
    np.testing.assert_allclose(gw, ref["w"], rtol=1e-6)
    np.testing.assert_allclose(gb, ref["b"], rtol=1e-6)
    # An int argnums returns the gradient unwrapped, like jax.value_and_grad.
    _, gx = gradient_norm_penalty(loss, 0.2, 0.0, argnums=1)(PARAMS["w"], X, PARAMS["b"], y=Y)
    np.testing.assert_array_equal(gx, jax.grad(loss, argnums=1)(PARAMS["w"], X, PARAMS["b"], y=Y))


def test_jit_with_traced_hyperparameters():
    @jax.jit
    def step(params, radius, alpha):
        return gradient_norm_penalty(_mlp_loss, radius, alpha)(params)

    value, grads = step(PARAMS, jnp.float32(0.1), jnp.float32(0.8))
    ref_value, ref_grads = gradient_norm_penalty(_mlp_loss, 0.1, 0.8)(PARAMS)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    _assert_tree_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)


def test_bfloat16_params_keep_dtype():
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), PARAMS)
    _, grads = gradient_norm_penalty(
        lambda p: _mlp_loss(p, X.astype(jnp.bfloat16), Y.astype(jnp.bfloat16)), 0.1, 0.8
    )(params16)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_nnx_model_with_batchnorm():
    """The docstring's recipe: split, merge(copy=True) in the loss, stats as aux."""
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, rngs=nnx.Rngs(1)),
        nnx.relu,
        nnx.Linear(4, 2, rngs=nnx.Rngs(2)),
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = jnp.array([0, 1] * 6)

    def loss_fn(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        return loss, nnx.state(model, nnx.BatchStat)

    (loss, stats), grads = jax.jit(gradient_norm_penalty(loss_fn, 0.1, 0.8, has_aux=True))(
        params, rest, X, labels
    )
    (ref_loss, ref_stats), plain = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rest, X, labels
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_tree_allclose(stats, ref_stats, rtol=1e-6)  # statistics of the unperturbed pass
    sam = _plain_sam_grad(lambda p: loss_fn(p, rest, X, labels)[0], params, 0.1)
    expected = jax.tree.map(lambda g, s: 0.2 * g + 0.8 * s, plain, sam)
    _assert_tree_allclose(grads, expected, rtol=1e-4, atol=1e-6)

    kernel_before = np.asarray(model.layers[0].kernel[...])
    nnx.update(model, stats)
    optimizer.update(model, grads)
    np.testing.assert_allclose(model.layers[1].mean[...], ref_stats["layers"][1]["mean"][...])
    np.testing.assert_allclose(
        model.layers[0].kernel[...],
        kernel_before - 0.1 * np.asarray(expected["layers"][0]["kernel"][...]),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"radius": -0.1}, "radius"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.2}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gradient_norm_penalty(_mlp_loss, **kwargs)
