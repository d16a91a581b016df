"""Activity perturbation (FG-A): per-example directional derivatives, unbiasedness,
variance against FG-W (Ren et al.'s Table 1), inactive units, forward mode only, local
losses on a LocalMixer, jit and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.estimators import (
    _common,
    activity_perturbation,
    check_perturbable,
    weight_perturbation,
)
from gcgd_jax.models import MLP, LocalMixer
from tests.estimators import stats

X = jax.random.normal(jax.random.key(1), (6, 12))
Y = jnp.arange(6) % 4


def _split(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _mlp(activation=jax.nn.relu, **kwargs):
    return MLP(12, (10, 10), 4, activation=activation, rngs=nnx.Rngs(0), **kwargs)


GRAPHDEF, PARAMS = _split(_mlp())


def _loss(graphdef, x, y):
    return lambda p: nnx.merge(graphdef, p).perturbed_loss(x, y).loss


GRAD = jax.jit(jax.grad(_loss(GRAPHDEF, X, Y)))(PARAMS)


def _draw(graphdef, params, x, y, n, estimator=None, seed=0):
    estimator = estimator or activity_perturbation()
    return stats.draw(
        lambda k: estimator(nnx.merge(graphdef, params), x, y, key=k)[1], n, seed=seed
    )


def test_per_example_derivatives_and_the_local_weight_estimate():
    """K = 1: the jvp of the per-example credits sums to grad_z L . u (reverse-mode
    check), and each kernel's estimate is x^T (d_b u_b * active) with x the layer's
    input and d_b example b's directional derivative."""
    key = jax.random.key(2)

    @jax.jit
    def run(params, key):
        model = nnx.merge(GRAPHDEF, params)
        out = model.perturbed_loss(X, Y)
        u = _common.normal_like(jax.random.split(key, 1)[0], dict(out.preactivations))
        zeros = jax.tree.map(jnp.zeros_like, u)
        _, d = jax.jvp(
            lambda p: dict(model.perturbed_loss(X, Y, perturbation=p).credits), (zeros,), (u,)
        )
        grad_z = jax.grad(lambda p: model.perturbed_loss(X, Y, perturbation=p).loss)(zeros)
        total = sum(jnp.vdot(grad_z[n], u[n]) for n in u)
        _, est = activity_perturbation()(model, X, Y, key=key)
        return out, u, d, total, est

    out, u, d, total, est = run(PARAMS, key)
    for name in u:  # every tap sees the same per-example derivatives (all layers perturbed)
        np.testing.assert_allclose(jnp.sum(d[name]), total, rtol=1e-5)
    for i, name in enumerate(u):
        g_z = jnp.where(out.active[name], d[name] * u[name], 0.0)
        layer = est["layers"][i]
        np.testing.assert_allclose(layer["kernel"], out.record[name].T @ g_z, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(layer["bias"], g_z.sum(0), rtol=1e-4, atol=1e-7)


def test_fg_a_is_unbiased_on_a_relu_mlp():
    stats.assert_unbiased(_draw(GRAPHDEF, PARAMS, X, Y, 4000), GRAD)


def test_variance_ratio_fg_w_over_fg_a_is_about_the_fan_in():
    """One dense layer (fan-in p = 32, q = 8 outputs, bias), one example: FG-W's total
    variance is (N + 1)|g|^2 with N = (p + 1) q = 264 weights, FG-A's (q + 1)|g|^2, so
    the ratio is 265/9 = 29.4, about p (Ren et al., Table 1). Measured with 8000
    estimates each: within 10% of the theory (about 4 standard errors)."""
    p, q = 32, 8
    graphdef, params = _split(MLP(p, (), q, rngs=nnx.Rngs(0)))
    x, y = jax.random.normal(jax.random.key(1), (1, p)), jnp.array([3])
    loss = _loss(graphdef, x, y)
    grad = [np.asarray(g, np.float64) for g in jax.tree.leaves(jax.grad(loss)(params))]
    norm2 = sum(np.sum(g**2) for g in grad)
    fg_w = weight_perturbation(loss)
    by_w = stats.draw(lambda k: fg_w(params, key=k)[1], 8000)
    by_a = _draw(graphdef, params, x, y, 8000, seed=1)

    def variance(samples):
        return sum(np.sum((s - g) ** 2) for s, g in zip(samples, grad)) / len(samples[0]) / norm2

    n_weights = (p + 1) * q
    var_w, var_a = variance(by_w), variance(by_a)
    assert abs(var_w / (n_weights + 1) - 1) < 0.1, var_w
    assert abs(var_a / (q + 1) - 1) < 0.1, var_a
    ratio = var_w / var_a
    assert abs(ratio / ((n_weights + 1) / (q + 1)) - 1) < 0.1, ratio
    assert 0.8 * p < ratio < 1.1 * p, ratio


def test_inactive_units_are_not_perturbed():
    """A hidden unit that no example activates: its kernel column and bias get exactly 0
    from FG-A (the true gradient), but noise with mask_inactive=False."""
    model = _mlp()
    model.layers[0].bias[...] = model.layers[0].bias[...].at[3].set(-100.0)
    graphdef, params = _split(model)
    key = jax.random.key(0)
    merged = nnx.merge(graphdef, params)
    _, masked = jax.jit(lambda m, k: activity_perturbation(2)(m, X, Y, key=k))(merged, key)
    _, unmasked = jax.jit(
        lambda m, k: activity_perturbation(2, mask_inactive=False)(m, X, Y, key=k)
    )(merged, key)
    assert np.all(np.asarray(masked["layers"][0]["kernel"])[:, 3] == 0)
    assert masked["layers"][0]["bias"][3] == 0
    assert np.any(np.asarray(unmasked["layers"][0]["kernel"])[:, 3] != 0)


def test_no_reverse_pass_through_the_network():
    """The network's ReLU has no VJP: jax.grad fails, FG-A runs (its only reverse pass is
    through each layer's own linear map) and gives the ordinary network's estimate."""
    graphdef, params = _split(_mlp(stats.forward_only_relu))
    with pytest.raises(Exception, match="[Rr]everse-mode"):
        jax.grad(_loss(graphdef, X, Y))(params)
    key = jax.random.key(4)

    @jax.jit
    def run(params, key):
        fwd = activity_perturbation(3)(nnx.merge(graphdef, params), X, Y, key=key)
        ref = activity_perturbation(3)(nnx.merge(GRAPHDEF, params), X, Y, key=key)
        return fwd, ref

    (loss_f, est), (loss_r, ref) = run(params, key)
    np.testing.assert_allclose(loss_f, loss_r, rtol=1e-6)
    assert stats.tree_allclose(est, ref, rtol=1e-4, atol=1e-7)


def test_jit_dtypes_and_no_retrace():
    graphdef, params = _split(_mlp(param_dtype=jnp.bfloat16))
    traces = []

    @jax.jit
    def step(params, x, y, key):
        traces.append(1)
        return activity_perturbation(2)(nnx.merge(graphdef, params), x, y, key=key)

    loss, grads = step(params, X, Y, jax.random.key(0))
    step(params, X + 1, Y, jax.random.key(1))
    assert len(traces) == 1
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert stats.leaf_dtypes(grads) == [jnp.bfloat16] * len(jax.tree.leaves(params))
    assert loss.dtype == jnp.float32 and np.isfinite(loss)


def test_models_that_cannot_be_perturbed_are_refused():
    class Plain(nnx.Module):
        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="Plain cannot be used.*perturbed_loss, local_pass"):
        activity_perturbation()(Plain(), X, Y, key=jax.random.key(0))
    with pytest.raises(TypeError, match="LocalMixer cannot.*downstream"):
        check_perturbable(LocalMixer, downstream=True)
    check_perturbable(MLP, downstream=True)
    check_perturbable(LocalMixer)
    with pytest.raises(ValueError, match="num_directions"):
        activity_perturbation(0)
