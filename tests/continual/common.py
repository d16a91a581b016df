"""Shared pieces of the continual-learning tests: fixtures, trees, random memories."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import optax

FIXTURES = Path(__file__).resolve().parent / "parity" / "fixtures"


def load_fixture(name: str) -> tuple[dict, dict]:
    """``(meta, arrays)`` of ``parity/fixtures/<name>.npz``."""
    with np.load(FIXTURES / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def split(vector: np.ndarray, shapes) -> list[np.ndarray]:
    """A flat vector (leading axes kept) as a list of leaves of the given shapes."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(vector[..., start : start + size].reshape(vector.shape[:-1] + tuple(shape)))
        start += size
    return out


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def apply(tx, grads, memory, mask=None, params=None):
    """The updates of one ``tx.update`` with the memory as extra arguments."""
    return tx.update(grads, tx.init(grads), params, memory_grads=memory, memory_mask=mask)[0]


def random_case(seed: int, num_tasks: int, shapes=((4, 6), (6,), (3, 2, 5)), drift=-1.0):
    """A params-like dict of leaves and memories ``(K, ...)``: g_k = shared + specific,
    the update drift * shared + noise."""
    rng = np.random.default_rng(seed)
    grads, memory = {}, {}
    for i, shape in enumerate(shapes):
        shared = rng.normal(size=shape)
        memory[f"l{i}"] = (shared + rng.normal(size=(num_tasks, *shape))).astype(np.float32)
        grads[f"l{i}"] = (drift * shared + rng.normal(size=shape)).astype(np.float32)
    return grads, memory


EMPTY = optax.EmptyState()


@functools.cache
def runner(factory, static: tuple = ()):
    """``jit(grads, memory, mask, *numbers) -> updates`` of ``factory(*numbers, **static)``.

    Numbers are traced and ``static`` is a tuple of ``(keyword, value)`` pairs, so one
    compiled program serves every margin and every number of valid tasks up to ``K``:
    the tests share a few programs instead of compiling one per case.
    """

    @jax.jit
    def run(grads, memory, mask, *numbers):
        tx = factory(*numbers, **dict(static))
        return tx.update(grads, EMPTY, memory_grads=memory, memory_mask=mask)[0]

    return run


def pad(memory: dict, num_rows: int, fill: float = 100.0) -> tuple[dict, np.ndarray]:
    """Memories padded to ``num_rows`` rows of ``fill`` noise, and the mask of real rows."""
    rng = np.random.default_rng(num_rows)
    out = {}
    for k, m in memory.items():
        extra = fill * rng.normal(size=(num_rows - len(m), *m.shape[1:]))
        out[k] = np.concatenate([m, extra.astype(m.dtype)])
    n = len(next(iter(memory.values())))
    return out, np.arange(num_rows) < n
