"""The model, the optimizer chain and the jitted steps (:mod:`gcgd_jax.continual.step`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gcgd_jax.continual.config import load_config
from gcgd_jax.continual.memory import memory_gradients
from gcgd_jax.continual.step import (
    build_correction,
    build_model,
    cross_entropy,
    group_labels,
    make_functions,
)
from tests.continual.tiny import TINY_SETTINGS

K, M, D, B = 3, 6, 16, 5  # tasks, memories, inputs, batch


def _setup(*overrides):
    cfg = load_config(None, [*TINY_SETTINGS, *overrides])
    graphdef, params = nnx.split(build_model(cfg, D, 10), nnx.Param)
    rng = np.random.default_rng(0)
    mem_x = jnp.asarray(rng.uniform(size=(K, M, D)), jnp.float32)
    mem_y = jnp.asarray(rng.integers(0, 10, (K, M)), jnp.int32)
    x = jnp.asarray(rng.uniform(size=(B, D)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, B), jnp.int32)
    return cfg, graphdef, params, (x, y, mem_x, mem_y)


def _loss(graphdef):
    return lambda p, x, y: cross_entropy(nnx.merge(graphdef, p)(x), y)


def _masked_sum() -> optax.GradientTransformationExtraArgs:
    """A probe: the update is sum_k mask[k] * memory_grads[k] (what the step passed)."""

    def update(updates, state, params=None, *, memory_grads=None, memory_mask=None, **extra):
        weights = memory_mask.astype(jnp.float32)
        return jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), memory_grads), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def test_the_step_passes_each_old_tasks_own_memory_gradient():
    """Inside the jitted step, row k of the memory gradients is jax.grad of the loss on
    task k's memory alone, and the mask lets through exactly the tasks seen (one
    compiled step for every number of tasks seen)."""
    _, graphdef, params, (x, y, mem_x, mem_y) = _setup()
    loss = _loss(graphdef)
    grad = jax.jit(jax.grad(loss))
    alone = [grad(params, mem_x[k], mem_y[k]) for k in range(K)]
    tx = optax.chain(_masked_sum(), optax.sgd(1.0))
    fns = make_functions(graphdef, tx, use_memory=True, eval_batch_size=64)
    for seen in range(K + 1):
        new, _, _ = fns.train_step(
            params, tx.init(params), x, y, mem_x, mem_y, jnp.arange(K) < seen
        )
        applied = jax.tree.map(lambda a, b: a - b, params, new)  # sgd(1.0): params - update
        expected = jax.tree.map(jnp.zeros_like, params)
        for k in range(seen):
            expected = jax.tree.map(jnp.add, expected, alone[k])
        for a, e in zip(jax.tree.leaves(applied), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)
    assert fns.train_step._cache_size() == 1
    # and memory_gradients itself, row by row, to float32 rounding
    rows = jax.jit(lambda p: memory_gradients(loss, p, mem_x, mem_y))(params)
    for k in range(K):
        for r, a in zip(jax.tree.leaves(rows), jax.tree.leaves(alone[k])):
            np.testing.assert_allclose(r[k], a, rtol=1e-5, atol=1e-7)


def test_a_task_is_the_scan_of_its_steps():
    cfg, graphdef, params, (_, _, mem_x, mem_y) = _setup("method.name=agem")
    tx = build_correction(cfg, params)
    fns = make_functions(graphdef, tx, use_memory=True, eval_batch_size=64)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.uniform(size=(4, B, D)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 10, (4, B)), jnp.int32)
    mask = jnp.arange(K) < 2
    p, s = params, tx.init(params)
    losses = []
    for i in range(4):
        p, s, loss = fns.train_step(p, s, xs[i], ys[i], mem_x, mem_y, mask)
        losses.append(loss)
    p2, _, losses2 = fns.train_task(params, tx.init(params), xs, ys, mem_x, mem_y, mask)
    np.testing.assert_allclose(losses2, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_plain_sgd_ignores_the_memory():
    cfg, graphdef, params, (x, y, mem_x, mem_y) = _setup()
    tx = build_correction(cfg, params)
    fns = make_functions(graphdef, tx, use_memory=False, eval_batch_size=64)
    new, _, _ = fns.train_step(params, tx.init(params), x, y, mem_x, mem_y, jnp.ones(K, bool))
    grads = jax.grad(_loss(graphdef))(params, x, y)
    for n, p, g in zip(*(jax.tree.leaves(t) for t in (new, params, grads))):
        np.testing.assert_allclose(n, p - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_evaluation_counts_correct_predictions_per_task():
    _, graphdef, params, _ = _setup()
    fns = make_functions(graphdef, optax.sgd(0.1), use_memory=False, eval_batch_size=7)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (20, D + 1), dtype=np.uint8)
    images[:, -1] = 0
    labels = rng.integers(0, 10, 20).astype(np.int32)
    maps = np.stack([rng.permutation(D) for _ in range(2)] + [np.full(D, D)]).astype(np.int32)
    counts = np.asarray(fns.evaluate(params, images, labels, maps))
    model = nnx.merge(graphdef, params)
    for t, pixel_map in enumerate(maps):
        x = images[:, pixel_map].astype(np.float32) / 255.0
        assert counts[t] == int(np.sum(np.argmax(model(x), -1) == labels))


def test_the_mlp_is_gems():
    cfg = load_config(None)
    model = build_model(cfg, 784, 10)
    shapes = [(784, 100), (100, 100), (100, 10)]
    for layer, shape in zip(model.layers, shapes):
        assert layer.kernel.shape == shape and not np.any(layer.bias[...])
        bound = np.sqrt(6.0 / sum(shape))  # Glorot-uniform, as GEM's Xavier()
        assert np.abs(layer.kernel[...]).max() <= bound
        assert np.abs(layer.kernel[...]).max() > 0.9 * bound


def test_group_labels():
    cfg = load_config(None)
    _, params = nnx.split(build_model(cfg, 784, 10), nnx.Param)
    leaves = lambda tree: [
        (jax.tree_util.keystr(path), label)
        for path, label in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    by_layer = dict(leaves(group_labels(params, "layer")))
    assert sorted(set(by_layer.values())) == [0, 1, 2]
    assert all(label == int(path.split("[")[2][0]) for path, label in by_layer.items())
    # the authors' code: {W1 b1 W2 b2 W3} and {b3}
    official = dict(leaves(group_labels(params, "official")))
    last_bias = [p for p in official if "[2]" in p and "bias" in p]
    assert [official[p] for p in last_bias] == [1]
    assert sorted(official.values()).count(0) == 5
    assert group_labels(params, "leaf") is None


def test_layerwise_and_whole_differ_and_options_reach_the_factory():
    outs = {}
    for name, extra in (
        ("layerwise_decomposition", ()),
        ("layerwise_decomposition_whole", ()),
        ("layerwise_decomposition", ("method.groups=leaf",)),
        ("layerwise_decomposition", ("method.options.memory_strength=0.0",)),
    ):
        cfg, graphdef, params, (x, y, mem_x, mem_y) = _setup(f"method.name={name}", *extra)
        tx = build_correction(cfg, params)
        fns = make_functions(graphdef, tx, use_memory=True, eval_batch_size=64)
        new, _, _ = fns.train_step(params, tx.init(params), x, y, mem_x, mem_y, jnp.arange(K) < 2)
        outs[(name, extra)] = np.concatenate([np.ravel(p) for p in jax.tree.leaves(new)])
    values = list(outs.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not np.allclose(values[i], values[j]), (list(outs)[i], list(outs)[j])
