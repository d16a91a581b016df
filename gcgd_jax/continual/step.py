"""The model, the optimizer chain and the jitted steps of a continual-learning run.

One train step, for the current batch ``(x, y)`` and the episodic memories of all
``K = num_tasks`` tasks (``(K, M, D)`` inputs, ``(K, M)`` labels):

1. ``g = grad L(params; x, y)`` (mean cross-entropy over the batch);
2. the memory gradients ``G[k] = grad L(params; memory_k)`` for every ``k`` at once
   (:func:`~gcgd_jax.continual.memory.memory_gradients`: ``jax.vmap`` of ``jax.grad`` over
   the task axis), in the
   same compiled program; rows of tasks not yet seen are computed on empty memories and
   masked out (``mask[k] = k < current task``), so one program serves every task;
3. ``optax.chain(correction, optax.sgd(lr)).update(g, ..., memory_grads=G,
   memory_mask=mask)`` and the parameter update.

Plain SGD (``method.name = "sgd"``) skips step 2. A task is one ``jax.lax.scan`` of the
step over its batches (:func:`make_functions`' ``train_task``); the evaluation gathers
each task's test inputs on the device from the shared images and its pixel map.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gcgd_jax import methods
from gcgd_jax.continual.config import ContinualConfig
from gcgd_jax.continual.memory import memory_gradients

__all__ = [
    "MLP",
    "ContinualFunctions",
    "build_correction",
    "build_model",
    "group_labels",
    "make_functions",
]


class MLP(nnx.Module):
    """A multilayer perceptron with ReLU hidden layers (GEM's ``model/common.py`` MLP).

    Every ``nnx.Linear`` starts as GEM's does: Glorot-uniform kernels
    (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``) and zero biases.
    """

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.layers = nnx.List(
            [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def build_model(cfg: ContinualConfig, input_size: int, num_classes: int) -> MLP:
    """The configuration's MLP, initialised from ``run.seed``."""
    sizes = [input_size, *cfg.train.hidden, num_classes]
    return MLP(sizes, rngs=nnx.Rngs(params=cfg.run.seed))


def group_labels(params: Any, grouping: str) -> Any:
    """Labels for :func:`~gcgd_jax.transforms.layerwise_gradient_decomposition`'s
    ``groups`` on :class:`MLP` parameters: ``"layer"`` (a layer's kernel and bias
    together), ``"official"`` (five consecutive tensors in PyTorch's order ``W1 b1 W2
    b2 ...``, as the authors' code groups them); ``"leaf"`` returns None (every tensor
    alone)."""
    if grouping == "leaf":
        return None

    def label(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        layer = next(k for k in keys if isinstance(k, int))
        if grouping == "layer":
            return layer
        position = 2 * layer + (0 if "kernel" in keys else 1)  # PyTorch: weight, then bias
        return position // 5

    return jax.tree_util.tree_map_with_path(label, params)


def build_correction(cfg: ContinualConfig, params: Any) -> optax.GradientTransformation:
    """``optax.chain(<method>, optax.sgd(lr))``; plain ``optax.sgd(lr)`` for ``"sgd"``.

    The method is read from the registry (:mod:`gcgd_jax.methods`, kind ``"continual"``):
    its factory with its ``fixed`` arguments and ``[method.options]``; a layerwise
    decomposition also gets ``groups`` from ``method.groups`` (:func:`group_labels`).
    """
    sgd = optax.sgd(cfg.train.lr)
    if cfg.method.name == "sgd":
        return sgd
    entry = methods.by_value("continual", cfg.method.name)
    factory = entry.load()
    kwargs = {**entry.fixed, **cfg.method.options}
    if "groups" in _parameters(factory) and kwargs.get("layerwise", True):
        kwargs["groups"] = group_labels(params, cfg.method.groups)
    return optax.chain(factory(**kwargs), sgd)


def _parameters(factory: Callable[..., Any]) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(factory).parameters)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class ContinualFunctions(NamedTuple):
    """The jitted functions of a run (see :func:`make_functions`)."""

    loss: Callable[..., jax.Array]  # (params, x, y) -> mean loss
    train_step: Callable[..., Any]  # (params, opt_state, x, y, mem_x, mem_y, mask) -> ...
    train_task: Callable[..., Any]  # (params, opt_state, xs, ys, mem_x, mem_y, mask) -> ...
    evaluate: Callable[..., jax.Array]  # (params, images, labels, maps) -> (T,) int32 correct


def make_functions(
    graphdef: Any, tx: optax.GradientTransformation, *, use_memory: bool, eval_batch_size: int
) -> ContinualFunctions:
    """The run's loss, its jitted train step, a task's jitted scan of steps and the jitted
    evaluation, for a model split as ``(graphdef, params)`` and the chain ``tx``.

    ``train_step(params, opt_state, x, y, mem_x, mem_y, mask)`` returns ``(params,
    opt_state, loss)``; ``train_task`` takes stacked batches ``xs (S, B, D)``, ``ys (S, B)``
    and returns ``(params, opt_state, losses (S,))``. ``use_memory=False`` (plain SGD)
    ignores the memory arguments. ``evaluate(params, images (N, D + 1) uint8, labels (N,),
    maps (T, D))`` returns the number of correct predictions on every task's test set.
    """

    def loss_fn(params, x, y):
        return cross_entropy(nnx.merge(graphdef, params)(x), y)

    def step(params, opt_state, x, y, mem_x, mem_y, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        extra = {}
        if use_memory:
            extra = {
                "memory_grads": memory_gradients(loss_fn, params, mem_x, mem_y),
                "memory_mask": mask,
            }
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    def task(params, opt_state, xs, ys, mem_x, mem_y, mask):
        def body(carry, batch):
            params, opt_state = carry
            params, opt_state, loss = step(params, opt_state, *batch, mem_x, mem_y, mask)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys))
        return params, opt_state, losses

    def evaluate(params, images, labels, maps):
        model = nnx.merge(graphdef, params)
        n = images.shape[0]
        chunk = min(eval_batch_size, n)
        pad = -n % chunk
        images = jnp.pad(images, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad), constant_values=-1)  # padding never counts

        def one_task(pixel_map):
            def one_chunk(start):
                rows = jax.lax.dynamic_slice_in_dim(images, start, chunk)
                x = jnp.take(rows, pixel_map, axis=1).astype(jnp.float32) / 255.0
                y = jax.lax.dynamic_slice_in_dim(labels, start, chunk)
                return jnp.sum(jnp.argmax(model(x), axis=-1) == y, dtype=jnp.int32)

            return jnp.sum(jax.lax.map(one_chunk, jnp.arange(0, n + pad, chunk)))

        return jax.lax.map(one_task, maps)

    return ContinualFunctions(
        loss=jax.jit(loss_fn),
        train_step=jax.jit(step),
        train_task=jax.jit(task),
        evaluate=jax.jit(evaluate),
    )
