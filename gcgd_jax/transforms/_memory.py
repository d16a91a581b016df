"""The memory-gradient argument shared by the continual-learning corrections.

:func:`~gcgd_jax.transforms.agem`, :func:`~gcgd_jax.transforms.gem` and
:func:`~gcgd_jax.transforms.layerwise_gradient_decomposition` receive the old tasks'
gradients as keyword arguments of ``update``:

* ``memory_grads``: a pytree with the structure of the updates, each leaf with a
  leading task axis ``K`` (``(K, *leaf.shape)``): row ``k`` is the gradient of the
  loss on task ``k``'s episodic memory. ``None`` (or absent): no old task, the update
  passes through.
* ``memory_mask``: ``(K,)`` booleans, which rows are valid (``None``: all). ``K`` is a
  shape, so one compiled step serves every number of observed tasks up to ``K``:
  grow the mask instead of the array.

Only real floating leaves take part; every other leaf passes through (its memory
leaf is ignored). Numbers are computed in at least float32 (float64 stays float64)
and results are cast back to each leaf's dtype.

:func:`memory_transformation` builds such a correction from its rule alone: the
transformation is stateless, passes the update through without ``memory_grads``, checks
and aligns the arguments (:func:`align`), hands them to the rule and puts the corrected
leaves back (:func:`rebuild`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gcgd_jax.transforms import _common

#: Full float32 precision for every product here (GPUs may otherwise use TF32, whose
#: 10-bit mantissa would spoil the projections).
HIGHEST = jax.lax.Precision.HIGHEST


class Memory(NamedTuple):
    """The updates and the memory gradients, aligned leaf by leaf."""

    updates: Any  # the updates, as given
    treedef: Any  # the updates' tree structure
    leaves: list  # every update leaf, as given
    float_ids: tuple[int, ...]  # positions (in ``leaves``) of the real floating leaves
    grads: list  # per float leaf: the update, in the compute dtype
    memories: list  # per float leaf: (K, *shape), in the compute dtype, invalid rows zeroed
    mask: jax.Array  # (K,) bool: valid rows
    count: jax.Array  # () compute dtype: number of valid rows


def align(updates: Any, memory_grads: Any, memory_mask: Any) -> Memory:
    """Checks ``memory_grads`` against ``updates`` and returns both aligned (see module)."""
    leaves, treedef = jax.tree.flatten(updates)
    try:
        mem_leaves = treedef.flatten_up_to(memory_grads)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`memory_grads` must have the structure of the updates, with a leading task "
            f"axis on every leaf: {err}"
        ) from None
    float_ids = tuple(i for i, g in enumerate(leaves) if _common.is_float(g))
    if not float_ids:
        raise ValueError("the updates have no floating-point leaf.")
    dtype = jnp.result_type(
        jnp.float32, *(leaves[i] for i in float_ids), *(mem_leaves[i] for i in float_ids)
    )
    num_tasks = None
    for i in float_ids:
        shape, mshape = jnp.shape(leaves[i]), jnp.shape(mem_leaves[i])
        if mshape[1:] != shape or (num_tasks is not None and mshape[0] != num_tasks):
            raise ValueError(
                f"`memory_grads` leaf {i} has shape {mshape}; expected (K, *{shape}) with "
                f"the same K on every leaf (K = {num_tasks})."
            )
        num_tasks = mshape[0]
    if memory_mask is None:
        mask = jnp.ones((num_tasks,), bool)
    else:
        mask = jnp.asarray(memory_mask)
        if mask.shape != (num_tasks,) or mask.dtype != jnp.bool_:
            raise ValueError(
                f"`memory_mask` must be a ({num_tasks},) boolean array, got "
                f"{mask.dtype}{list(mask.shape)}."
            )
    grads, memories = [], []
    for i in float_ids:
        grads.append(jnp.asarray(leaves[i]).astype(dtype))
        m = jnp.asarray(mem_leaves[i]).astype(dtype)
        memories.append(jnp.where(mask.reshape((-1,) + (1,) * (m.ndim - 1)), m, 0))
    return Memory(
        updates, treedef, leaves, float_ids, grads, memories, mask, mask.sum().astype(dtype)
    )


def rebuild(memory: Memory, new_grads: list) -> Any:
    """The updates with the float leaves replaced by ``new_grads`` (in their own dtypes)."""
    leaves = list(memory.leaves)
    for i, new in zip(memory.float_ids, new_grads):
        leaves[i] = new.astype(jnp.result_type(leaves[i]))
    return jax.tree.unflatten(memory.treedef, leaves)


def memory_transformation(
    correct: Callable[[Memory], list],
) -> optax.GradientTransformationExtraArgs:
    """A stateless correction fed the memory gradients (see module), from its rule.

    ``correct(memory)`` receives the aligned :class:`Memory` and returns the corrected
    float leaves (in the order and compute dtype of ``memory.grads``). The ``update``
    takes ``memory_grads`` and ``memory_mask`` as keyword arguments and ignores
    ``params`` and any other; without ``memory_grads`` the updates pass through.
    """

    def update_fn(updates, state, params=None, *, memory_grads=None, memory_mask=None, **extra):
        del params, extra
        if memory_grads is None:
            return updates, state
        memory = align(updates, memory_grads, memory_mask)
        return rebuild(memory, correct(memory)), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def dot(xs: list, ys: list) -> jax.Array:
    """``sum over leaves of <x, y>`` for aligned lists of leaves of one shape each."""
    return sum(jnp.vdot(x, y, precision=HIGHEST) for x, y in zip(xs, ys))


def task_dots(memories: list, vectors: list) -> jax.Array:
    """``(K,)``: ``sum over leaves of <memory[k], v>``."""
    return sum(
        jnp.matmul(m.reshape(m.shape[0], -1), v.reshape(-1), precision=HIGHEST)
        for m, v in zip(memories, vectors)
    )
