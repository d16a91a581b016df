"""The bare ``jax.jit`` ResNet train step the speed benchmarks time.

Softmax cross-entropy, ``optax.add_decayed_weights`` + ``optax.sgd`` with
momentum, the fusion breaker passed as a runtime ``1.0``, batch already on the
device, no augmentation, guard or metrics. ``compute`` casts the parameters and
the input inside the step (bf16 compute with f32 master weights); float32 is
the plain step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def make_bare_step(
    model: Any,
    x: Any,
    y: Any,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    fusion_breaker: bool = True,
    compute: Any = None,
) -> tuple[Callable[[], None], Any]:
    """Returns ``(run, params)``: ``run()`` does one step and blocks until it is done."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    compute = jnp.float32 if compute is None else compute
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))

    def step(params, rest, opt_state, breaker):
        def loss_fn(params):
            cast = jax.tree.map(lambda p: p.astype(compute), params)
            m = nnx.merge(graphdef, cast, rest, copy=True)
            fb = breaker.astype(compute) if fusion_breaker else None
            logits = m(x.astype(compute), fusion_breaker=fb)
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), y
            ).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1, 2))
    state = [params, rest, tx.init(params)]
    breaker = jnp.float32(1.0)

    def run() -> None:
        *new, loss = fn(*state, breaker)
        state[:] = new
        jax.block_until_ready(loss)

    return run, params
