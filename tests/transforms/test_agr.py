"""Properties of ``agr`` against a NumPy reference."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcgd_jax.transforms.agr import agr
from tests.transforms.conformance import apply_once, assert_non_float_leaves_pass_through

RNG = np.random.default_rng(0)
TREE = {
    "conv": RNG.normal(size=(3, 3, 4, 8)).astype(np.float32),
    "dense": RNG.normal(size=(6, 8)).astype(np.float32),
    "bias": RNG.normal(size=(8,)).astype(np.float32),
    "scalar": np.float32(0.7),
}


def reference(g, eps=1e-12):
    g = np.asarray(g, np.float64)
    return g * (1 - np.abs(g) / (np.abs(g).sum() + eps))


def _apply(tree, **kwargs):
    return apply_once(agr(**{"leaves": "all", **kwargs}), tree)


def test_matches_reference_on_every_leaf():
    out = _apply(TREE)
    for name, g in TREE.items():
        np.testing.assert_allclose(out[name], reference(g), rtol=1e-6, atol=1e-7)
    assert float(out["scalar"]) == pytest.approx(0.0, abs=1e-6)  # one entry: all its own share


def test_default_regularises_kernels_only():
    out = apply_once(agr(), TREE)
    for name in ("conv", "dense"):
        np.testing.assert_allclose(out[name], reference(TREE[name]), rtol=1e-6, atol=1e-7)
    for name in ("bias", "scalar"):
        np.testing.assert_array_equal(out[name], TREE[name])
    with pytest.raises(ValueError, match="`leaves`"):
        agr(leaves="biases")


@given(
    g=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
def test_shrinks_each_entry_keeps_signs(g):
    out = np.asarray(_apply(g), np.float64)
    g64 = g.astype(np.float64)
    assert np.all(np.abs(out) <= np.abs(g64) * (1 + 1e-6))
    assert np.all(out * g64 >= 0)  # coefficient in [0, 1]: signs kept, a descent direction
    np.testing.assert_allclose(out, reference(g), rtol=1e-5, atol=1e-5 * (1 + np.abs(g).max()))


@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_zero_gradient_stays_zero_without_nan(eps):
    zeros = {"w": np.zeros((3, 4), np.float32), "b": np.zeros((4,), np.float32)}
    out = _apply(zeros, eps=eps)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(leaf))
        np.testing.assert_array_equal(leaf, 0.0)
    # Also under jit, where XLA may reorder the division.
    out = jax.jit(lambda g: _apply(g, eps=eps))(zeros)
    for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0.0)


def test_single_nonzero_entry_is_zeroed():
    g = np.zeros((3, 4), np.float32)
    g[1, 2] = 5.0
    np.testing.assert_array_equal(_apply(g, eps=0.0), 0.0)


def test_large_leaf_is_nearly_identity():
    g = RNG.normal(size=(64, 64)).astype(np.float32)
    out = np.asarray(_apply(g))
    assert np.abs(out - g).max() < 1e-2 * np.abs(g).max()


def test_bf16_keeps_dtype():
    g = jnp.asarray(TREE["dense"], jnp.bfloat16)
    out = _apply(g)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), reference(np.asarray(g, np.float32)), rtol=1e-2, atol=1e-2
    )


def test_non_float_leaves_pass_through():
    assert_non_float_leaves_pass_through(agr())


def test_bad_eps():
    for eps in (-1e-12, float("nan"), "0", None, True):
        with pytest.raises(ValueError, match="`eps`"):
            agr(eps=eps)
    agr(eps=0.0)
