"""The episodic memory: which examples each task keeps, the store, their gradients.

GEM (``model/gem.py``) keeps ``M`` memories per task in a ring buffer: every batch of
the current task is written at a counter that runs across tasks and wraps at ``M``,
and a batch that reaches the end of the buffer is cut (its remaining examples are not
stored). A task's memory is read only once the task is over, so it is a fixed set of
the task's examples, known from the numbers alone (:func:`ring_buffer_slots`).

:class:`EpisodicMemory` holds every task's memory in one ``(K, M, D)`` array, ``K``
the number of tasks, filled task by task; :func:`memory_gradients` differentiates the
loss on all ``K`` memories at once. Nothing here imports JAX at module level (the
configuration checks use :func:`ring_buffer_slots`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["EpisodicMemory", "memory_gradients", "ring_buffer_slots"]


def ring_buffer_slots(
    num_tasks: int, samples_per_task: int, batch_size: int, memory_size: int
) -> list[list[int]]:
    """Which training example of each task its memory keeps, as GEM's ring buffer does.

    Returns, per task, the position (in the task's presentation order) of the example
    in each of the ``memory_size`` slots; ``-1`` where the task wrote nothing into a
    slot (the configuration check refuses that).
    """
    count = 0
    out = []
    for _ in range(num_tasks):
        slots = [-1] * memory_size
        for start in range(0, samples_per_task, batch_size):
            size = min(batch_size, samples_per_task - start)
            end = min(count + size, memory_size)
            for i in range(end - count):
                slots[count + i] = start + i
            count = 0 if end == memory_size else end
        out.append(slots)
    return out


class EpisodicMemory:
    """Every task's memories in fixed-shape arrays: ``x`` ``(K, M, D)`` float32 and ``y``
    ``(K, M)`` int32, zero for the tasks not stored yet.

    Args:
        num_tasks: ``K``.
        memory_size: ``M``.
        input_size: ``D``.
    """

    def __init__(self, num_tasks: int, memory_size: int, input_size: int):
        self.x = np.zeros((num_tasks, memory_size, input_size), np.float32)
        self.y = np.zeros((num_tasks, memory_size), np.int32)
        self.stored = np.zeros((num_tasks,), bool)

    @property
    def num_tasks(self) -> int:
        return int(self.x.shape[0])

    def store(self, task: int, x: np.ndarray, y: np.ndarray) -> None:
        """Task ``task``'s memories (``(M, D)`` inputs, ``(M,)`` labels)."""
        self.x[task], self.y[task] = x, y
        self.stored[task] = True

    def mask(self, current_task: int) -> np.ndarray:
        """``(K,)`` bool: the tasks before ``current_task`` (those whose memories count)."""
        return np.arange(self.num_tasks) < current_task


def memory_gradients(
    loss_fn: Callable[[Any, Any, Any], Any], params: Any, memory_x: Any, memory_y: Any
) -> Any:
    """``jax.grad(loss_fn)`` on every task's memory at once: ``(K, M, ...)`` inputs and
    ``(K, M)`` labels give the params' tree with a leading task axis ``K`` (``jax.vmap``
    over tasks, one compiled program for all of them)."""
    import jax

    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, memory_x, memory_y)
