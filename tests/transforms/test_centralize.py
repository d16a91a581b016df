"""Properties of ``centralize`` against NumPy references and ``optax.centralize``."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcgd_jax.transforms.centralize import centralize
from tests.transforms.conformance import apply_once, assert_non_float_leaves_pass_through

RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(3, 3, 4, 5)).astype(np.float32)  # Flax (kh, kw, in, out)
DENSE = RNG.normal(size=(6, 5)).astype(np.float32)  # Flax (in, out)
BIAS = RNG.normal(size=(5,)).astype(np.float32)

TO_TORCH = (3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
FROM_TORCH = tuple(np.argsort(TO_TORCH))


def reference(g: np.ndarray) -> np.ndarray:
    """NumPy: subtract the mean over every axis but the last."""
    g = np.asarray(g, np.float64)
    return g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True)


def _apply(tree, **kwargs):
    return apply_once(centralize(**kwargs), tree)


def test_matches_numpy_reference_and_zero_fan_in_mean():
    out = _apply({"conv": CONV, "dense": DENSE, "bias": BIAS})
    for name, g in [("conv", CONV), ("dense", DENSE)]:
        np.testing.assert_allclose(out[name], reference(g), atol=1e-6)
        fan_in = tuple(range(g.ndim - 1))
        np.testing.assert_allclose(np.asarray(out[name]).mean(axis=fan_in), 0.0, atol=1e-6)
    np.testing.assert_array_equal(out["bias"], BIAS)  # 1-D untouched


@given(
    g=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5),
        elements=st.floats(-100, 100, width=32),
    )
)
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
def test_zero_fan_in_mean_per_output_unit_any_shape(g):
    out = np.asarray(_apply(g), np.float64)
    np.testing.assert_allclose(out, reference(g), atol=1e-4 * (1 + np.abs(g).max()))
    scale = 1 + np.abs(g).max()
    assert np.all(np.abs(out.mean(axis=tuple(range(g.ndim - 1)))) <= 1e-5 * scale)


def test_equals_optax_centralize_in_pytorch_layout():
    # optax.centralize reduces axes 1..n: right for PyTorch's (out, in, kh, kw).
    torch_conv = np.transpose(CONV, TO_TORCH)
    expected_conv = np.transpose(apply_once(optax.centralize(), torch_conv), FROM_TORCH)
    expected_dense = apply_once(optax.centralize(), DENSE.T).T  # (out, in) -> (in, out)
    out = _apply({"conv": CONV, "dense": DENSE})
    np.testing.assert_allclose(out["conv"], expected_conv, atol=1e-6)
    np.testing.assert_allclose(out["dense"], expected_dense, atol=1e-6)


def test_optax_centralize_on_flax_kernel_does_not_centre_output_units():
    wrong = np.asarray(apply_once(optax.centralize(), CONV))
    fan_in_means = wrong.mean(axis=(0, 1, 2))
    assert np.abs(fan_in_means).max() > 1e-2  # not centred per output unit
    assert np.abs(wrong - np.asarray(_apply(CONV))).max() > 1e-2


def test_axis_zero_matches_optax_centralize():
    for g in (np.transpose(CONV, TO_TORCH), DENSE.T):
        np.testing.assert_allclose(_apply(g, axis=0), apply_once(optax.centralize(), g), atol=1e-6)


def test_conv_only_leaves_dense_kernels_alone():
    out = _apply({"conv": CONV, "dense": DENSE, "bias": BIAS}, conv_only=True)
    np.testing.assert_allclose(out["conv"], reference(CONV), atol=1e-6)
    np.testing.assert_array_equal(out["dense"], DENSE)
    np.testing.assert_array_equal(out["bias"], BIAS)


def test_removes_exactly_the_per_unit_constant():
    # Adding any per-output-unit constant does not change the result; centring twice = once.
    shift = RNG.normal(size=(1, 1, 1, 5)).astype(np.float32)
    once = np.asarray(_apply(CONV))
    np.testing.assert_allclose(_apply(CONV + shift), once, atol=1e-5)
    np.testing.assert_allclose(_apply(once), once, atol=1e-6)


def test_bf16_keeps_dtype_and_is_close_to_f32():
    g = jnp.asarray(CONV + 3.0, jnp.bfloat16)  # a large common offset
    out = _apply(g)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), reference(np.asarray(g, np.float32)), atol=3e-2
    )


def test_non_float_leaves_pass_through():
    assert_non_float_leaves_pass_through(centralize())


def test_grad_of_integer_input_passes_through():
    def loss(params):
        return jnp.sum(params["w"] ** 2) + 0.0 * params["step"]

    params = {"w": jnp.asarray(DENSE), "step": jnp.asarray(3)}
    grads = jax.grad(loss, allow_int=True)(params)
    out = _apply(grads)
    assert out["step"].dtype == jax.dtypes.float0


def test_bad_axis():
    with pytest.raises(TypeError, match="`axis`"):
        centralize(axis=1.5)
    with pytest.raises(TypeError, match="`axis`"):
        centralize(axis="last")
    with pytest.raises(ValueError, match=r"`axis`=2 .*\['w'\]"):
        _apply({"w": DENSE}, axis=2)
