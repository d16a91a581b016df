r"""GEM's continual-learning metrics from the accuracy matrix.

With ``T`` tasks, :math:`R_{i,j}` the test accuracy on task :math:`j` after training on
tasks :math:`0..i`, and :math:`b_j` the accuracy on task :math:`j` of the model at its
random initialisation (the same model, before any step), Lopez-Paz and Ranzato define

.. math::

  \mathrm{ACC} = \frac1T \sum_{j=0}^{T-1} R_{T-1,j}, \qquad
  \mathrm{BWT} = \frac1{T-1} \sum_{j=0}^{T-2} \left(R_{T-1,j} - R_{j,j}\right), \qquad
  \mathrm{FWT} = \frac1{T-1} \sum_{j=1}^{T-1} \left(R_{j-1,j} - b_j\right).

GEM's code (``metrics/metrics.py``, and the layerwise decomposition's code built on
it) averages the same terms over all ``T`` tasks, the last task's zero BWT term and the
first task's zero FWT term included, so its printed BWT and FWT are the paper's times
``(T - 1) / T``; both are returned (``*_gem_code``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["continual_metrics"]


def continual_metrics(
    matrix: Sequence[Sequence[float]], baseline: Sequence[float]
) -> dict[str, float]:
    """ACC, BWT and FWT (the paper's definitions) of a ``(T, T)`` accuracy matrix.

    Args:
      matrix: ``R[i][j]``, the accuracy on task ``j`` after training task ``i``.
      baseline: ``b[j]``, the accuracy on task ``j`` at the random initialisation.

    Returns:
      ``acc``, ``bwt``, ``fwt``; ``bwt_gem_code`` and ``fwt_gem_code`` (averaged over
      ``T`` as GEM's code does); ``learning_acc`` (the mean of the diagonal, each task
      just after it was learned).

    Example:
      >>> m = continual_metrics([[0.9, 0.2], [0.7, 0.8]], [0.1, 0.1])
      >>> {k: round(v, 4) for k, v in m.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'acc': 0.75, 'bwt': -0.2, 'fwt': 0.1, 'bwt_gem_code': -0.1, 'fwt_gem_code': 0.05,
       'learning_acc': 0.85}
    """
    r = np.asarray(matrix, np.float64)
    b = np.asarray(baseline, np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 2 or b.shape != (r.shape[0],):
        raise ValueError(
            f"expected a (T, T) matrix with T >= 2 and T baseline values, got {r.shape} and "
            f"{b.shape}"
        )
    t = r.shape[0]
    backward = r[-1, :-1] - np.diag(r)[:-1]
    forward = np.array([r[j - 1, j] - b[j] for j in range(1, t)])
    return {
        "acc": float(r[-1].mean()),
        "bwt": float(backward.mean()),
        "fwt": float(forward.mean()),
        "bwt_gem_code": float(backward.sum() / t),
        "fwt_gem_code": float(forward.sum() / t),
        "learning_acc": float(np.diag(r).mean()),
    }
