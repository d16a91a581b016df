"""``mars_correction`` against a NumPy reference of MARS-approx (Yuan et al. 2024)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcgd_jax.transforms.mars_correction import MarsCorrectionState, mars_correction
from tests.transforms.conformance import assert_non_float_leaves_pass_through

RNG = np.random.default_rng(0)
SHAPES = {"conv": (3, 3, 2, 4), "dense": (5, 3), "bias": (3,)}


def stream(steps, scale=0.2):
    return [
        {k: (scale * RNG.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]


def reference(grads, gamma, beta1, max_norm):
    """c_t = g_t + γ β/(1-β) (g_t - g_{t-1}), difference 0 at t = 0, clipped per tensor."""
    out, prev = [], None
    for g in grads:
        step = {}
        for k, v in g.items():
            v = v.astype(np.float64)
            c = v if prev is None else v + gamma * beta1 / (1 - beta1) * (v - prev[k])
            norm = np.linalg.norm(c)
            if max_norm is not None and norm > max_norm:
                c = c * max_norm / norm
            step[k] = c
        out.append(step)
        prev = {k: v.astype(np.float64) for k, v in g.items()}
    return out


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"gamma": 0.1, "beta1": 0.9, "max_norm": None}, {"gamma": 0.05, "max_norm": 0.3}],
)
def test_matches_numpy_reference(kwargs):
    grads = stream(6, scale=0.5)
    tx = mars_correction(**kwargs)
    full = {"gamma": 0.025, "beta1": 0.95, "max_norm": 1.0, **kwargs}
    expected = reference(grads, **full)
    state = tx.init(grads[0])
    update = jax.jit(tx.update)
    clipped = 0
    for g, e in zip(grads, expected):
        out, state = update(g, state)
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(out[k], np.float64), e[k], rtol=2e-6, atol=1e-7)
            clipped += full["max_norm"] is not None and np.linalg.norm(e[k]) >= full["max_norm"] * (
                1 - 1e-6
            )
    if full["max_norm"] is not None:
        assert clipped > 0  # the clipping branch is exercised
    assert isinstance(state, MarsCorrectionState) and int(state.count) == len(grads)


def test_first_step_is_identity_without_clipping_and_gamma_zero_is_identity():
    g = stream(3)
    tx = mars_correction(max_norm=None)
    out, _ = tx.update(g[0], tx.init(g[0]))
    jax.tree.map(np.testing.assert_array_equal, out, g[0])
    tx0 = mars_correction(gamma=0.0, max_norm=None)
    s = tx0.init(g[0])
    for gi in g:
        out, s = tx0.update(gi, s)
        jax.tree.map(np.testing.assert_array_equal, out, gi)


def test_bf16_keeps_dtype_and_state_dtype():
    g = {"w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.bfloat16)}
    tx = mars_correction()
    s = tx.init(g)
    out, s2 = tx.update(g, s)
    assert out["w"].dtype == jnp.bfloat16 and s2.prev_grad["w"].dtype == jnp.float32


def test_non_float_leaves_pass_through():
    assert_non_float_leaves_pass_through(mars_correction())


def test_inside_masked_and_chain():
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    mask = {"conv": True, "dense": True, "bias": False}
    tx = optax.chain(optax.masked(mars_correction(max_norm=None), mask), optax.sgd(1.0))
    s = tx.init(params)
    grads = stream(3)
    for g in grads:
        u, s = tx.update(g, s, params)
        np.testing.assert_array_equal(u["bias"], -g["bias"])
    e = reference(grads, 0.025, 0.95, None)[-1]
    np.testing.assert_allclose(u["dense"], -e["dense"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"gamma": -0.1}, "gamma"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta1": float("nan")}, "beta1"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"max_norm": "1"}, "max_norm"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        mars_correction(**kwargs)
