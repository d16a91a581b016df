"""Properties of ``channel_directed`` against NumPy references."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcgd_jax.transforms.channel_directed import H0_DEFAULT_LAM, channel_directed
from tests.transforms.conformance import apply_once, assert_non_float_leaves_pass_through

RNG = np.random.default_rng(0)
CONV = RNG.normal(size=(3, 3, 4, 8)).astype(np.float32)  # Flax (kh, kw, in, out)
DENSE = RNG.normal(size=(6, 8)).astype(np.float32)
BIAS = RNG.normal(size=(8,)).astype(np.float32)


def _apply(tree, *args, **kwargs):
    return apply_once(channel_directed(*args, **kwargs), tree)


def h0_reference(g, lam):
    g = np.asarray(g, np.float64)
    m = g.mean(axis=-1, keepdims=True)
    return m + (g - m) / lam


def sobolev_reference(g, lam):
    """Dense least-squares solve of the periodic system; no FFT."""
    g = np.asarray(g, np.float64)
    c = g.shape[-1]
    f = g.reshape(-1, c).T  # (C, fan-in positions)
    m = f.mean(axis=0, keepdims=True)
    eye = np.eye(c)
    laplacian = np.roll(eye, 1, axis=0) - 2 * eye + np.roll(eye, -1, axis=0)
    system = np.vstack([-lam * laplacian, np.ones((1, c))])  # ... and mean(u) = 0
    rhs = np.vstack([f - m, np.zeros((1, f.shape[1]))])
    u = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return (m + u).T.reshape(g.shape)


def default_sobolev_lam(c):
    return 1.0 / (4.0 * np.sin(np.pi / c) ** 2)


def test_h0_lam_one_is_identity():
    out = _apply({"conv": CONV}, "h0", lam=1.0)
    np.testing.assert_allclose(out["conv"], CONV, atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 2.0, 7.5])
def test_h0_matches_reference(lam):
    np.testing.assert_allclose(_apply(CONV, "h0", lam=lam), h0_reference(CONV, lam), atol=1e-6)


def test_h0_default_lam():
    np.testing.assert_allclose(_apply(CONV), h0_reference(CONV, H0_DEFAULT_LAM), atol=1e-6)


@pytest.mark.parametrize("lam", [0.05, 1.0, 10.0])
def test_sobolev_matches_dense_solve_and_residual_is_zero(lam):
    out = np.asarray(_apply(CONV, "sobolev", lam=lam), np.float64)
    np.testing.assert_allclose(out, sobolev_reference(CONV, lam), rtol=1e-4, atol=1e-4)
    f = CONV.astype(np.float64)
    m = f.mean(axis=-1, keepdims=True)
    u = out - m
    residual = -lam * (np.roll(u, -1, axis=-1) - 2 * u + np.roll(u, 1, axis=-1)) - (f - m)
    assert np.abs(residual).max() <= 1e-5 * np.abs(f).max() * max(1.0, lam)
    np.testing.assert_allclose(u.mean(axis=-1), 0.0, atol=1e-6)


@given(
    g=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9)),
        elements=st.floats(-10, 10, width=32),
    ),
    lam=st.floats(0.1, 20.0),
)
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
def test_sobolev_matches_dense_solve_any_width(g, lam):
    out = np.asarray(_apply(g, "sobolev", lam=lam), np.float64)
    np.testing.assert_allclose(out, sobolev_reference(g, lam), atol=2e-4 * (1 + np.abs(g).max()))


def test_sobolev_default_lam_is_the_no_amplification_value():
    for c in (2, 3, 8, 64):
        g = RNG.normal(size=(2, 2, 3, c)).astype(np.float32)
        expected = _apply(g, "sobolev", lam=float(default_sobolev_lam(c)))
        out = np.asarray(_apply(g, "sobolev"), np.float64)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        # A pure smoother: the deviation from the channel mean never grows.
        m = g.mean(axis=-1, keepdims=True)
        assert np.linalg.norm(out - m) <= np.linalg.norm(g - m) * (1 + 1e-5)
        # ... and the slowest mode passes with gain exactly 1.
        mode = np.cos(2 * np.pi * np.arange(c) / c).astype(np.float32) * np.ones((1, 1, 1, c))
        np.testing.assert_allclose(_apply(mode, "sobolev"), mode, atol=1e-5)


@pytest.mark.parametrize("metric,lam", [("h0", 3.0), ("sobolev", 0.5), ("sobolev", None)])
def test_smooths_only_along_the_output_channel_axis(metric, lam):
    # A component constant along the channel axis passes unchanged ...
    constant = np.broadcast_to(RNG.normal(size=(3, 3, 4, 1)), CONV.shape).astype(np.float32)
    np.testing.assert_allclose(_apply(constant, metric, lam=lam), constant, atol=1e-5)
    # ... the channel mean is kept ...
    out = np.asarray(_apply(CONV, metric, lam=lam))
    np.testing.assert_allclose(out.mean(axis=-1), CONV.mean(axis=-1), atol=1e-5)
    # ... and fan-in positions are never mixed: mixing them before equals after.
    mix = RNG.normal(size=(36, 36)).astype(np.float32)
    mixed = (mix @ CONV.reshape(36, 8)).reshape(CONV.shape)
    np.testing.assert_allclose(
        np.asarray(_apply(mixed, metric, lam=lam)).reshape(36, 8),
        mix @ out.reshape(36, 8),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_which_leaves(metric):
    tree = {"conv": CONV, "dense": DENSE, "bias": BIAS, "k1d": DENSE[None]}
    out = _apply(tree, metric)
    assert np.abs(np.asarray(out["conv"]) - CONV).max() > 1e-2
    for name in ("dense", "bias", "k1d"):
        np.testing.assert_array_equal(out[name], tree[name])
    out = _apply(tree, metric, include_dense=True)
    for name in ("conv", "dense", "k1d"):
        assert np.abs(np.asarray(out[name]) - tree[name]).max() > 1e-2
    np.testing.assert_array_equal(out["bias"], BIAS)


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_single_output_channel_is_unchanged(metric):
    g = RNG.normal(size=(3, 3, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(_apply(g, metric, lam=2.0), g, atol=1e-6)
    np.testing.assert_allclose(_apply(g, metric), g, atol=1e-6)


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_axis_argument(metric):
    torch_layout = np.transpose(CONV, (3, 2, 0, 1))  # (out, in, kh, kw)
    out = _apply(torch_layout, metric, lam=2.0, axis=0)
    np.testing.assert_allclose(
        np.transpose(out, (2, 3, 1, 0)), _apply(CONV, metric, lam=2.0), atol=1e-5
    )
    with pytest.raises(ValueError, match=r"`axis`=5"):
        _apply({"w": CONV}, metric, axis=5)


@pytest.mark.parametrize("metric", ["h0", "sobolev"])
def test_non_float_leaves_pass_through(metric):
    assert_non_float_leaves_pass_through(channel_directed(metric, include_dense=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="`metric`"):
        channel_directed("l2")
    with pytest.raises(ValueError, match="`metric`"):
        channel_directed(None)
    for lam in (0.5, 0.0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="`lam`"):
            channel_directed("h0", lam=lam)
    for lam in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="`lam`"):
            channel_directed("sobolev", lam=lam)
    channel_directed("h0", lam=1.0)  # the boundary is allowed
    with pytest.raises(TypeError, match="`axis`"):
        channel_directed("h0", axis=None)
