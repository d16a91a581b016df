"""``grokfast_ema`` against a NumPy reference of Grokfast-EMA (Lee et al. 2024)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcgd_jax.transforms.grokfast_ema import GrokfastEMAState, grokfast_ema
from tests.transforms.conformance import assert_non_float_leaves_pass_through

RNG = np.random.default_rng(1)
SHAPES = {"conv": (3, 3, 2, 4), "dense": (5, 3), "bias": (3,)}


def stream(steps):
    return [
        {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)
    ]


def reference(grads, alpha, lamb):
    """The official ``gradfilter_ema``: h starts at the first gradient, ĝ = g + λ h."""
    h, out = None, []
    for g in grads:
        g = {k: v.astype(np.float64) for k, v in g.items()}
        h = dict(g) if h is None else h
        h = {k: alpha * h[k] + (1 - alpha) * g[k] for k in g}
        out.append({k: g[k] + lamb * h[k] for k in g})
    return out


@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.8, "lamb": 0.5}, {"alpha": 0.0, "lamb": 1.0}])
def test_matches_numpy_reference(kwargs):
    grads = stream(8)
    full = {"alpha": 0.98, "lamb": 2.0, **kwargs}
    tx = grokfast_ema(**kwargs)
    state = tx.init(grads[0])
    update = jax.jit(tx.update)
    for g, e in zip(grads, reference(grads, **full)):
        out, state = update(g, state)
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(out[k], np.float64), e[k], rtol=1e-5, atol=1e-6)
    assert isinstance(state, GrokfastEMAState) and int(state.count) == len(grads)


def test_first_step_amplifies_by_one_plus_lambda_and_zero_lambda_is_identity():
    g = stream(3)
    tx = grokfast_ema(lamb=2.0)
    out, _ = tx.update(g[0], tx.init(g[0]))
    jax.tree.map(lambda o, x: np.testing.assert_allclose(o, 3 * x, rtol=1e-6), out, g[0])
    tx0 = grokfast_ema(lamb=0.0)
    s = tx0.init(g[0])
    for gi in g:
        out, s = tx0.update(gi, s)
        jax.tree.map(np.testing.assert_array_equal, out, gi)


def test_bf16_keeps_dtype():
    g = {"w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.bfloat16)}
    tx = grokfast_ema()
    out, s = tx.update(g, tx.init(g))
    assert out["w"].dtype == jnp.bfloat16 and s.ema["w"].dtype == jnp.float32


def test_non_float_leaves_pass_through():
    assert_non_float_leaves_pass_through(grokfast_ema())


def test_inside_masked():
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    tx = optax.masked(grokfast_ema(), {"conv": False, "dense": True, "bias": True})
    s = tx.init(params)
    g = stream(1)[0]
    u, s = tx.update(g, s, params)
    np.testing.assert_array_equal(u["conv"], g["conv"])
    np.testing.assert_allclose(u["dense"], 3 * g["dense"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"lamb": -1.0}, "lamb"),
        ({"lamb": None}, "lamb"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        grokfast_ema(**kwargs)
