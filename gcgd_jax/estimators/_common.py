"""Helpers shared by the estimators: argument checks, direction sampling, casts."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def check_num_directions(num_directions: Any) -> int:
    """``num_directions`` as a Python int >= 1 (it sets a shape, so it is static)."""
    if isinstance(num_directions, bool) or not isinstance(num_directions, int):
        raise TypeError(
            f"`num_directions` must be a Python int (it is static), got {num_directions!r}."
        )
    if num_directions < 1:
        raise ValueError(f"`num_directions` must be >= 1, got {num_directions}.")
    return num_directions


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype estimates are formed in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def check_float_leaves(tree: Any, what: str) -> None:
    """Every leaf of ``tree`` is a floating-point array (a direction needs one)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"{what} must hold floating-point arrays only; "
                f"{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}."
            )


def normal_like(key: jax.Array, tree: Any) -> Any:
    """Standard normal samples shaped like the leaves of ``tree`` (float32 at least).

    One draw of the total size, cut into the leaves: a draw per leaf would compile
    one random-bits generator per leaf (seconds of XLA compile for a small model).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtypes = [compute_dtype(jnp.result_type(x)) for x in leaves]
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.result_type(*dtypes))
    samples, start = [], 0
    for x, size, dtype in zip(leaves, sizes, dtypes):
        samples.append(flat[start : start + size].reshape(jnp.shape(x)).astype(dtype))
        start += size
    return jax.tree.unflatten(treedef, samples)


def cast_like(tree: Any, like: Any) -> Any:
    """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(jnp.result_type(y)), tree, like)
