"""Properties of ``znorm`` against a NumPy reference."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gcgd_jax.transforms.znorm import znorm
from tests.transforms.conformance import apply_once, assert_non_float_leaves_pass_through

RNG = np.random.default_rng(0)
CONV = (3.0 + 0.01 * RNG.normal(size=(3, 3, 4, 8))).astype(np.float32)  # offset, small spread
DENSE = RNG.normal(size=(6, 8)).astype(np.float32)
BIAS = RNG.normal(size=(8,)).astype(np.float32)


def reference(g, eps=1e-12):
    g = np.asarray(g, np.float64)
    return (g - g.mean()) / (g.std() + eps)


def _apply(tree, **kwargs):
    return apply_once(znorm(**kwargs), tree)


def test_matches_reference_zero_mean_unit_std():
    out = _apply({"conv": CONV, "dense": DENSE, "bias": BIAS})
    for name, g in [("conv", CONV), ("dense", DENSE)]:
        o = np.asarray(out[name], np.float64)
        np.testing.assert_allclose(o, reference(g), rtol=1e-4, atol=1e-4)
        assert abs(o.mean()) < 1e-5 and abs(o.std() - 1) < 1e-5
    np.testing.assert_array_equal(out["bias"], BIAS)  # 1-D untouched


@given(
    g=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    scale=st.floats(1e-3, 1e3),
)
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
def test_unit_variance_and_scale_invariance(g, scale):
    assume(g.std() > 1e-2 * (1 + np.abs(g).max()))  # not (nearly) constant
    out = np.asarray(_apply(g), np.float64)
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    np.testing.assert_allclose(_apply(g * np.float32(scale)), out, atol=1e-3)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1.0])
def test_constant_and_zero_leaves_give_zero_not_nan(eps):
    out = _apply(
        {"c": np.full((3, 4), 2.5, np.float32), "z": np.zeros((2, 2), np.float32)}, eps=eps
    )
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0.0)


def test_eps_enters_the_denominator():
    np.testing.assert_allclose(_apply(DENSE, eps=0.5), reference(DENSE, 0.5), rtol=1e-5, atol=1e-6)


def test_bf16_statistics_in_float32():
    g = jnp.asarray(CONV, jnp.bfloat16)  # mean 3, std 0.01: bf16 statistics would be poor
    out = _apply(g)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), reference(np.asarray(g, np.float32)), atol=3e-2
    )


def test_non_float_leaves_pass_through():
    assert_non_float_leaves_pass_through(znorm())


def test_bad_eps():
    for eps in (-1e-12, -1.0, float("nan"), "1e-12", None):
        with pytest.raises(ValueError, match="`eps`"):
            znorm(eps=eps)
    znorm(eps=0.0)
