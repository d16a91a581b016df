"""How close an estimate is to the gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["cosine_similarity"]


def _dot(a: Any, b: Any) -> jax.Array:
    return sum(
        jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def cosine_similarity(a: Any, b: Any, *, per_leaf: bool = False, eps: float = 1e-30) -> Any:
    r"""Cosine similarity :math:`\langle a, b\rangle / (\lVert a\rVert \lVert b\rVert)`
    of two trees with the same structure, in float32.

    Args:
        a, b: trees of arrays with the same structure (e.g. an estimate and the
            gradient).
        per_leaf: return a tree of per-leaf similarities (per layer and kind of
            parameter) instead of one over all leaves.
        eps: added to the product of norms (a zero tree gives 0, not NaN).

    Returns:
        A scalar, or a tree of scalars shaped like ``a`` when ``per_leaf``.

    Example:
        >>> import jax.numpy as jnp
        >>> from gcgd_jax.estimators import cosine_similarity
        >>> print(cosine_similarity({"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}))
        0.70710677
    """
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError("`a` and `b` must have the same tree structure.")
    if per_leaf:
        return jax.tree.map(lambda x, y: cosine_similarity(x, y, eps=eps), a, b)
    return _dot(a, b) / (jnp.sqrt(_dot(a, a)) * jnp.sqrt(_dot(b, b)) + eps)
