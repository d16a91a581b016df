"""The conformance checks of ``tests/transforms/conformance.py``, for transforms that need
the memory gradients as extra arguments (that harness calls ``update`` without them, and
without them these transforms are the identity): jit, chains, no recompilation when the
number of valid tasks changes, ``inject_hyperparams``, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcgd_jax.transforms.agem import agem
from gcgd_jax.transforms.gem import gem
from gcgd_jax.transforms.layerwise_decomposition import layerwise_gradient_decomposition
from tests.continual.common import random_case
from tests.transforms.conformance import assert_same_avals, assert_trees_close

FACTORIES = {
    "layerwise_decomposition": layerwise_gradient_decomposition,
    "gem": gem,
    "agem": agem,
}
SHAPES = ((2, 2, 3, 4), (3, 4), (4,))  # the harness's conv kernel, dense kernel and bias
K = 4


def _problem(dtype=jnp.float32):
    grads, memory = random_case(0, K, shapes=SHAPES, drift=-2.0)
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
    return cast(grads), cast(memory)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jit_chain_extra_args_and_no_recompilation(name):
    """A jitted train step with ``chain(tx, sgd)`` (which forwards the memory) and unknown
    keyword arguments: traced once while 0, 1, ..., K tasks become valid (the mask is
    traced); its updates are -lr times the transform's own; the state keeps its avals.
    (jit against eager: ``test_parity.py`` runs jitted, the property tests eagerly.)"""
    grads, memory = _problem()
    tx = FACTORIES[name]()
    chained = optax.chain(FACTORIES[name](), optax.sgd(0.1))
    traces = []

    @jax.jit
    def step(params, state, memory, mask):
        traces.append(None)
        updates, state = chained.update(
            grads, state, params, memory_grads=memory, memory_mask=mask, value=1.0, unknown=2
        )
        alone, _ = tx.update(grads, tx.init(grads), memory_grads=memory, memory_mask=mask)
        return updates, alone, optax.apply_updates(params, updates), state

    params, state = grads, chained.init(grads)
    for n in range(K + 1):
        updates, alone, params, state = step(params, state, memory, jnp.arange(K) < n)
        assert_same_avals(state, chained.init(grads))
        scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(alone))
        expected = jax.tree.map(lambda u: -0.1 * u, alone)
        assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6 * scale)
        changed = not all(np.array_equal(alone[k], grads[k]) for k in grads)
        assert changed == (n > 0)  # the identity exactly when no task is valid
    assert len(traces) == 1 and step._cache_size() == 1


@pytest.mark.parametrize("name", ["layerwise_decomposition", "gem", "agem"])
def test_inject_hyperparams_gives_the_same_updates(name):
    grads, memory = _problem()
    plain = FACTORIES[name](memory_strength=0.3)
    injected = optax.inject_hyperparams(FACTORIES[name])(memory_strength=0.3)

    @jax.jit
    def both(grads, memory):
        a = plain.update(grads, plain.init(grads), memory_grads=memory)[0]
        b, istate = injected.update(grads, injected.init(grads), memory_grads=memory)
        return a, b, istate.hyperparams["memory_strength"]

    a, b, strength = both(grads, memory)
    assert_trees_close(b, a)
    assert float(strength) == pytest.approx(0.3)


def test_bf16_is_kept():
    """bf16 gradients and memories give bf16 updates, through all three transforms in one
    chain (each receives the memory; float32 is checked above)."""
    grads, memory = _problem(jnp.bfloat16)
    tx = optax.chain(*(f() for f in FACTORIES.values()), optax.sgd(0.1, momentum=0.9))
    state = tx.init(grads)
    updates, new_state = jax.jit(lambda g, s, m: tx.update(g, s, g, memory_grads=m))(
        grads, state, memory
    )
    assert_same_avals(updates, grads, what="bf16 updates")
    assert_same_avals(new_state, state, what="bf16 state")
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_without_memory_it_passes_through(name):
    grads, _ = _problem()
    tx = FACTORIES[name]()
    out, state = tx.update(grads, tx.init(grads), grads, value=1.0)
    assert out is grads and state == optax.EmptyState()
