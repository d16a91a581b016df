"""``gem``: its QP solver against brute force, and the promises of the projection (the
official ``project2cone2`` + quadprog comparison is in ``test_parity.py``)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.transforms.gem import gem, nonnegative_qp
from tests.continual.common import pad, random_case, runner


def _brute_force(quad: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} 1/2 w'Qw - b'w`` by trying every set of positive entries."""
    n = len(b)
    best, value = None, np.inf
    for size in range(n + 1):
        for free in itertools.combinations(range(n), size):
            w = np.zeros(n)
            if free:
                idx = list(free)
                w[idx] = np.linalg.solve(quad[np.ix_(idx, idx)], b[idx])
            if np.all(w >= 0) and (v := 0.5 * w @ quad @ w - b @ w) < value:
                best, value = w, v
    return best


def test_the_active_set_solver_finds_the_optimum():
    """Random positive definite QPs of 1 to 5 variables, some nearly singular, some with
    inactive variables: the same minimiser as trying every active set."""
    rng = np.random.default_rng(0)
    problems = []
    for i in range(40):
        n = 1 + i % 5
        a = rng.normal(size=(n, 8)) * rng.uniform(0.1, 10)
        if i % 3 == 0:  # nearly collinear rows: badly conditioned Q
            a = 0.95 * a[:1] + 0.05 * a
        quad = a @ a.T + 1e-3 * np.eye(n)
        b = rng.normal(size=n) * np.abs(quad).max()
        active = rng.uniform(size=n) < 0.8
        pad = 5 - n  # one compiled solver: pad to 5 variables, the padding inactive
        quad = np.pad(quad, ((0, pad), (0, pad))) + np.diag([0] * n + [1] * pad)
        problems.append((quad, np.pad(b, (0, pad)), np.pad(active, (0, pad))))
    quads, bs, actives = (np.stack(x) for x in zip(*problems))
    with jax.enable_x64(True):
        solve = jax.jit(jax.vmap(nonnegative_qp))
        ws = np.asarray(solve(jnp.asarray(quads), jnp.asarray(bs), jnp.asarray(actives)))
    for quad, b, active, w in zip(quads, bs, actives, ws):
        idx = np.flatnonzero(active)
        expected = np.zeros(5)
        expected[idx] = _brute_force(quad[np.ix_(idx, idx)], b[idx])
        np.testing.assert_allclose(w, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())


def _multipliers(grads, memory, out) -> tuple[np.ndarray, np.ndarray]:
    """``v`` with ``out = g + G'v`` (least squares) and ``G out``, float64."""
    g = np.concatenate([np.ravel(grads[k]) for k in grads]).astype(np.float64)
    mem = np.concatenate([memory[k].reshape(len(memory[k]), -1) for k in grads], 1).astype(
        np.float64
    )
    x = np.concatenate([np.ravel(np.asarray(out[k])) for k in grads]).astype(np.float64)
    v = np.linalg.lstsq(mem.T, x - g, rcond=None)[0]
    return v, mem @ x, mem @ g, np.linalg.norm(mem, axis=1) * np.linalg.norm(x)


@pytest.mark.parametrize("num_tasks", [1, 3, 5])
def test_the_projection_keeps_its_promises(num_tasks):
    """eps = 0: no old task's loss increases (g_k'x >= 0); eps > 0: g_k'x >= -eps v_k;
    every multiplier >= the margin; no conflict: the identity."""
    update = runner(gem)  # one program: K padded to 5
    seen_conflict = False
    for seed in range(6):
        grads, memory = random_case(seed, num_tasks, drift=(-2.0, -0.5, 1.0)[seed % 3])
        for strength, eps in ((0.0, 0.0), (0.5, 1e-3), (0.1, 1e-3)):
            out = update(grads, *pad(memory, 5), strength, eps)
            v, dots, before, scale = _multipliers(grads, memory, out)
            tol = 1e-5 * scale
            if np.all(before >= 0):
                for k in grads:
                    np.testing.assert_array_equal(out[k], grads[k])
                continue
            seen_conflict = True
            assert np.all(v >= strength - 1e-4)
            assert np.all(dots >= -eps * v - tol)
    assert seen_conflict


def test_padding_masked_rows_changes_nothing():
    grads, memory = random_case(3, 3, drift=-2.0)
    update = runner(gem)
    expected = update(grads, *pad(memory, 5), 0.5, 1e-3)
    shuffled = {k: np.concatenate([-10 * m[:2], m[::-1]]) for k, m in memory.items()}
    out = update(grads, shuffled, np.array([False, False, True, True, True]), 0.5, 1e-3)
    for k in grads:
        np.testing.assert_allclose(out[k], expected[k], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kwargs", [{"memory_strength": -0.1}, {"eps": -1.0}, {"eps": None}])
def test_invalid_options_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
        gem(**kwargs)
