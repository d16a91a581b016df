"""Weight perturbation (FG-W): directional derivatives, unbiasedness, forward mode only,
local credits and exact heads, jit and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.estimators import Credited, _common, weight_perturbation
from gcgd_jax.models import MLP
from tests.estimators import stats

X = jax.random.normal(jax.random.key(1), (6, 12))
Y = jnp.arange(6) % 4


def _mlp_loss(activation=jax.nn.relu):
    model = MLP(12, (10, 10), 4, activation=activation, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p, x, y):
        return nnx.merge(graphdef, p).perturbed_loss(x, y).loss

    return loss_fn, params


LOSS, PARAMS = _mlp_loss()
GRAD = jax.jit(jax.grad(LOSS))(PARAMS, X, Y)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_jvp_is_the_directional_derivative_and_scales_its_direction():
    """K = 1: the estimate is (grad . v) v with v the sampled direction, and the jvp the
    estimator uses is grad . v (checked against the reverse-mode gradient)."""
    key = jax.random.key(3)
    v = _common.normal_like(jax.random.split(key, 1)[0], PARAMS)

    @jax.jit
    def run(params, v, key):
        _, jvp = jax.jvp(lambda p: LOSS(p, X, Y), (params,), (v,))
        return jvp, weight_perturbation(LOSS)(params, X, Y, key=key)

    jvp, (value, estimate) = run(PARAMS, v, key)
    dot = _vdot(GRAD, v)
    np.testing.assert_allclose(jvp, dot, rtol=1e-5)
    np.testing.assert_allclose(value, LOSS(PARAMS, X, Y), rtol=1e-6)
    expected = jax.tree.map(lambda t: dot * t, v)
    assert stats.tree_allclose(estimate, expected, rtol=1e-4, atol=1e-7)


def test_fg_w_is_unbiased_on_a_relu_mlp():
    """Per leaf and element, the mean of 4000 estimates is within its standard error of
    the gradient, and the relative error of the mean shrinks like 1/sqrt(n): by about 4
    from 250 to 4000 estimates (measured: 1.05, 0.51, 0.26 at 250, 1000, 4000)."""
    estimate = weight_perturbation(LOSS)
    samples = stats.draw(lambda k: estimate(PARAMS, X, Y, key=k)[1], 4000)
    stats.assert_unbiased(samples, GRAD)
    errors = [stats.check(samples, GRAD, n).relative_error for n in (250, 1000, 4000)]
    assert 2.5 < errors[0] / errors[2] < 6.5, errors


def test_k_directions_average_k_estimates():
    """K directions in one call are the mean of the K single-direction estimates."""
    key = jax.random.key(5)

    @jax.jit
    def run(key):
        _, mean_k = weight_perturbation(LOSS, num_directions=8)(PARAMS, X, Y, key=key)
        singles = []
        for k in jax.random.split(key, 8):
            v = _common.normal_like(k, PARAMS)
            _, d = jax.jvp(lambda p: LOSS(p, X, Y), (PARAMS,), (v,))
            singles.append(jax.tree.map(lambda t, d=d: d * t, v))
        return mean_k, jax.tree.map(lambda *t: sum(t) / 8, *singles)

    mean_k, mean_singles = run(key)
    assert stats.tree_allclose(mean_k, mean_singles, rtol=1e-4, atol=1e-7)


def test_no_reverse_pass_is_needed():
    """The network has a ReLU without a VJP: jax.grad fails, FG-W gives the same
    estimate as on the ordinary network."""
    fwd_only, params = _mlp_loss(stats.forward_only_relu)
    with pytest.raises(Exception, match="[Rr]everse-mode"):
        jax.grad(fwd_only)(params, X, Y)
    key = jax.random.key(0)
    _, est = jax.jit(weight_perturbation(fwd_only, 3))(params, X, Y, key=key)
    _, ref = jax.jit(weight_perturbation(LOSS, 3))(PARAMS, X, Y, key=key)
    assert stats.tree_allclose(est, ref, rtol=1e-4, atol=1e-7)


def _last_layer(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).startswith("['layers'][2]"), params
    )


def test_exact_leaves_get_the_exact_gradient_and_no_direction():
    estimate = weight_perturbation(LOSS, exact=_last_layer)
    samples = stats.draw(lambda k: estimate(PARAMS, X, Y, key=k)[1], 4000)
    # leaves of layer 2 come last in the flattened order: bias, kernel
    for s, g in zip(samples[-2:], jax.tree.leaves(GRAD["layers"][2])):
        np.testing.assert_allclose(s, np.broadcast_to(g, s.shape), rtol=1e-4, atol=1e-7)
    stats.assert_unbiased(samples[:-2], jax.tree.leaves(GRAD)[:-2])
    with pytest.raises(ValueError, match="structure"):
        weight_perturbation(LOSS, exact={"a": True})(PARAMS, X, Y, key=jax.random.key(0))


def test_credited_losses_use_each_leafs_own_directional_derivative():
    """Two independent sums of squares: credited, each half's estimate uses its own
    derivative (d_a v_a, d_b v_b), unbiased and with less variance than (d_a + d_b) v."""
    target = {"a": jnp.linspace(-1, 1, 30), "b": jnp.linspace(2, 0, 40)}

    def halves(p):
        return {k: 0.5 * jnp.sum((p[k] - target[k]) ** 2) for k in "ab"}

    params = {"a": jnp.ones(30), "b": jnp.ones(40)}
    grad = jax.tree.map(lambda p, t: p - t, params, target)
    credited = weight_perturbation(lambda p: Credited(sum(halves(p).values()), halves(p)))
    plain = weight_perturbation(lambda p: sum(halves(p).values()))
    local = stats.draw(lambda k: credited(params, key=k)[1], 4000)
    glob = stats.draw(lambda k: plain(params, key=k)[1], 4000)
    stats.assert_unbiased(local, grad)
    stats.assert_unbiased(glob, grad)
    var_local = sum(np.sum(s.var(0)) for s in local)
    var_global = sum(np.sum(s.var(0)) for s in glob)
    assert var_local < 0.75 * var_global, (var_local, var_global)
    value, _ = credited(params, key=jax.random.key(0))
    np.testing.assert_allclose(value, sum(halves(params).values()), rtol=1e-6)


def test_has_aux_and_jit_without_retracing():
    traces = []

    def loss_fn(w, a):
        traces.append(1)
        return jnp.sum(jnp.sin(w) * a), {"norm": jnp.sum(w**2)}

    estimate = jax.jit(weight_perturbation(loss_fn, num_directions=2, has_aux=True))
    w, a = jnp.arange(4.0), jnp.ones(4)
    (value, aux), g = estimate(w, a, key=jax.random.key(0))
    count = len(traces)
    (value2, _), g2 = estimate(w, 2 * a, key=jax.random.key(1))
    assert len(traces) == count  # same shapes, other key and data: no retrace
    np.testing.assert_allclose(aux["norm"], 14.0)
    np.testing.assert_allclose(value2, 2 * value, rtol=1e-6)
    assert not np.allclose(g, g2)


def test_dtypes_and_structure_are_preserved():
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.float32)}

    def loss_fn(p):
        return jnp.sum((p["w"].astype(jnp.float32) @ jnp.ones(2) + jnp.sum(p["b"])) ** 2)

    _, g = jax.jit(weight_perturbation(loss_fn, 4))(params, key=jax.random.key(0))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert stats.leaf_dtypes(g) == stats.leaf_dtypes(params)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_bad_num_directions(bad, error):
    with pytest.raises(error, match="num_directions"):
        weight_perturbation(jnp.sum, bad)


def test_integer_params_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        weight_perturbation(lambda w: 0.0)(jnp.arange(3), key=jax.random.key(0))
