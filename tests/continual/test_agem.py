"""``agem``: the promise on the reference gradient and its limit on single tasks (the
comparison with grad-cl's functions is in ``test_parity.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from gcgd_jax.transforms.agem import agem
from gcgd_jax.transforms.gem import gem
from tests.continual.common import apply, flat, pad, random_case, runner


def _reference(memory) -> np.ndarray:
    return np.concatenate([m.reshape(len(m), -1) for m in memory.values()], 1).mean(0)


def test_no_conflict_is_the_identity_and_a_conflict_is_projected_away():
    tx = agem()
    for seed, drift in enumerate((1.0, -1.0, -3.0, 0.5)):
        grads, memory = random_case(seed, 3, drift=drift)
        out = apply(tx, grads, memory)
        ref, g = _reference(memory), flat(grads)
        if g @ ref >= 0:
            for k in grads:
                np.testing.assert_array_equal(out[k], grads[k])
        else:
            x = flat(out)
            assert abs(x @ ref) <= 1e-5 * np.linalg.norm(x) * np.linalg.norm(ref)
            np.testing.assert_allclose(x, g - (g @ ref) / (ref @ ref) * ref, rtol=1e-5, atol=1e-5)


def test_single_tasks_are_not_protected():
    """Two old tasks pulling apart: the update keeps the mean, not each task."""
    grads = {"w": np.array([2.0, -1.0, 0.0], np.float32)}
    memory = {"w": np.array([[1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], np.float32)}
    x = flat(apply(agem(), grads, memory))
    dots = memory["w"] @ x
    assert abs(dots.mean()) < 1e-6 and dots.min() < -0.1


def test_the_margin_variant_is_gem_on_the_mean_gradient():
    """grad-cl's A-GEM baseline: GEM's QP with the mean memory gradient as its one row."""
    for seed, drift in enumerate((-0.3, -3.0)):
        grads, memory = random_case(seed, 4, drift=drift)
        mean = {k: m.mean(0, keepdims=True) for k, m in memory.items()}
        out = apply(agem(0.5, 1e-3), grads, memory)
        expected = runner(gem)(grads, *pad(mean, 5), 0.5, 1e-3)
        np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-5, atol=1e-5)


def test_padding_masked_rows_changes_nothing():
    grads, memory = random_case(5, 2, drift=-2.0)
    expected = apply(agem(), grads, memory)
    padded = {k: np.concatenate([m, 50 * np.ones_like(m)]) for k, m in memory.items()}
    out = apply(agem(), grads, padded, np.array([True, True, False, False]))
    np.testing.assert_allclose(flat(out), flat(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"memory_strength": -0.1}, {"eps": -1.0}])
def test_invalid_options_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=f"`{next(iter(kwargs))}`"):
        agem(**kwargs)
