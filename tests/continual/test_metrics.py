"""GEM's metrics (:mod:`gcgd_jax.continual.metrics`) on a matrix computed by hand."""

from __future__ import annotations

import pytest

from gcgd_jax.continual.metrics import continual_metrics

# R[i][j]: accuracy on task j after training task i; b[j]: at the random initialisation.
R = [
    [0.90, 0.15, 0.20],
    [0.70, 0.80, 0.30],
    [0.60, 0.50, 0.95],
]
B = [0.10, 0.12, 0.08]


def test_acc_bwt_fwt_by_hand():
    m = continual_metrics(R, B)
    # ACC: the last row's mean.
    assert m["acc"] == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    # BWT: final minus just-learned accuracy of the tasks before the last, over T - 1.
    assert m["bwt"] == pytest.approx(((0.60 - 0.90) + (0.50 - 0.80)) / 2)
    # FWT: accuracy on task j before training it (after task j - 1) minus b_j, j >= 1.
    assert m["fwt"] == pytest.approx(((0.15 - 0.12) + (0.30 - 0.08)) / 2)
    # GEM's metrics.py averages the same terms over all T tasks.
    assert m["bwt_gem_code"] == pytest.approx(m["bwt"] * 2 / 3)
    assert m["fwt_gem_code"] == pytest.approx(m["fwt"] * 2 / 3)
    assert m["learning_acc"] == pytest.approx((0.90 + 0.80 + 0.95) / 3)


def test_no_forgetting_and_no_transfer():
    perfect = [[1.0, 0.1], [1.0, 1.0]]
    m = continual_metrics(perfect, [0.1, 0.1])
    assert m["acc"] == 1.0 and m["bwt"] == 0.0 and m["fwt"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "matrix, baseline",
    [([[1.0]], [0.1]), ([[1.0, 0.5]], [0.1, 0.1]), ([[1.0, 0.5], [0.5, 1.0]], [0.1])],
)
def test_shapes_are_checked(matrix, baseline):
    with pytest.raises(ValueError, match=r"expected a \(T, T\) matrix"):
        continual_metrics(matrix, baseline)
