"""The gradient-quality summary pairs each method with the baseline on the same minibatch."""

import pytest

from experiments.studies.grad_quality import _cos, summarize


def _rec(method, seed, probe, value, step=10):
    return {
        "seed": seed,
        "probe": probe,
        "step": step,
        "method": method,
        "cos_all": value,
        "cos_kernels": value,
        "cos_selected": value,
    }


def test_summary_reports_paired_differences_from_the_baseline():
    records = []
    for seed in range(3):
        for probe in range(4):
            noise = 0.1 * (seed - 1) + 0.05 * probe  # shared by both methods: cancels when paired
            records.append(_rec("baseline", seed, probe, 0.5 + noise))
            records.append(_rec("gc_w", seed, probe, 0.52 + noise))
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["gc_w"]["d_cos_all"] == pytest.approx(0.02)
    assert rows["gc_w"]["d_cos_all_lo"] == pytest.approx(0.02)  # no spread left after pairing
    assert rows["gc_w"]["cos_all_hi"] - rows["gc_w"]["cos_all_lo"] > 0.05  # unpaired: wide
    assert rows["baseline"]["d_cos_selected"] == 0.0
    assert rows["gc_w"]["n"] == 12


def test_cosine_of_parameter_lists():
    import jax.numpy as jnp

    a = [jnp.array([1.0, 0.0]), jnp.array([[0.0]])]
    b = [jnp.array([1.0, 1.0]), jnp.array([[0.0]])]
    assert float(_cos(a, b)) == pytest.approx(2**-0.5)


def test_cosine_spans_every_leaf_and_matches_numpy():
    """Against the cosine of the concatenated leaves: a cosine that skipped a leaf, or was
    not normalised, would differ; scale-free, and -1 for opposite directions."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(0), 6)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    a = [jax.random.normal(k, s) for k, s in zip(keys[:3], shapes)]
    b = [jax.random.normal(k, s) + 0.5 * x for k, s, x in zip(keys[3:], shapes, a)]
    fa = np.concatenate([np.ravel(x) for x in a])
    fb = np.concatenate([np.ravel(y) for y in b])
    expected = fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
    assert 0.1 < expected < 0.9
    assert float(_cos(a, b)) == pytest.approx(expected, rel=1e-5)
    assert float(_cos([3.0 * x for x in a], b)) == pytest.approx(expected, rel=1e-5)
    assert float(_cos(a, [-2.0 * x for x in a])) == pytest.approx(-1.0, rel=1e-6)
    assert float(_cos(a, [jnp.zeros(s) for s in shapes])) == 0.0
