"""The jitted train and eval steps over split NNX state.

State is functional: ``nnx.split(model, nnx.Param, ...)`` gives a static
``graphdef``, the parameters and the rest (BatchNorm statistics and any other
model variables); the optax state sits beside them in :class:`TrainState`.
This is the computation ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` performs
(``tx.update(grads, opt_state, params, value=loss)``, then
``optax.apply_updates``), written out so that one ``jax.jit`` (not
``nnx.jit``, which costs 10-14 ms of Python per step) compiles the whole step,
the state can be donated, sharded and checkpointed as one pytree.

Inside the train step: augmentation (random crop + flip, on device, keyed by
``fold_in(rng, step)``) and normalisation of uint8 images, the forward pass in
training mode (BatchNorm statistics updated), the loss (cross-entropy or
PowerGrad, plus the GC-ODE auxiliary loss times its weight), its gradient
(or the gradient-norm-penalty gradient), the optimizer update, and the
non-finite guard: when the loss, any gradient or any updated parameter is
not finite the update is
not applied (parameters, optimizer state and BatchNorm statistics keep their
values) and ``nonfinite`` counts it; under the ``"stop"`` policy ``halted``
is set and every later step is a no-op too, so the state stays at the last
good one until the host notices and stops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gcgd_jax.train.optim import current_lr

__all__ = [
    "StepOptions",
    "TrainState",
    "make_eval_step",
    "make_train_step",
    "preprocess",
]


class TrainState(NamedTuple):
    """Everything a train step reads and writes (one pytree, replicated)."""

    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of every other model variable (BatchNorm statistics, ...)
    opt_state: Any  # optax state of the whole chain (GC-W state included)
    step: jax.Array  # () int32: train steps taken (skipped ones included)
    rng: jax.Array  # (2,) uint32: base key of the augmentation
    nonfinite: jax.Array  # () int32: steps whose loss or gradient was not finite
    halted: jax.Array  # () bool: a non-finite step happened under nan_policy="stop"


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static settings of the steps (hashable; part of the compiled program)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_padding: int = 4
    loss: str = "ce"  # "ce" or "powergrad"
    powergrad_alpha: float = 0.25
    penalty: str = "none"  # "none" or "gradient_norm"
    penalty_radius: float = 0.1
    penalty_alpha: float = 0.8
    gc_ode: bool = False  # call the model with return_aux=True
    gc_ode_aux_weight: float = 1.0
    gc_w: bool = False  # report GC-W's predictor loss
    gc_w_v2: bool = False  # report GC-W v2's last predictor objective
    fusion_breaker: bool = False
    nan_policy: str = "stop"


def preprocess(images: jax.Array, opts: StepOptions, key: jax.Array | None) -> jax.Array:
    """uint8 NHWC -> float32, augmented when ``key`` is given, normalised."""
    from gcgd_jax.data.augment import normalize, random_crop_flip

    if key is not None and opts.augment:
        images = random_crop_flip(key, images, pad=opts.crop_padding)
    return normalize(images, np.asarray(opts.mean, np.float32), np.asarray(opts.std, np.float32))


def _per_example_loss(logits: jax.Array, labels: jax.Array, opts: StepOptions) -> jax.Array:
    if opts.loss == "powergrad":
        from gcgd_jax.transforms.powergrad import powergrad_cross_entropy

        return powergrad_cross_entropy(logits, labels, opts.powergrad_alpha)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: StepOptions
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) train step ``(state, images, labels, fusion_breaker) -> (state, metrics)``.

    ``images`` are uint8 NHWC, ``labels`` int32, ``fusion_breaker`` a float32
    scalar 1.0 passed at run time (ignored unless ``opts.fusion_breaker``).
    Metrics (float32/int32 scalars): ``loss`` (the data loss, mean over the
    batch), ``correct`` (count), ``finite``, ``lr``, and ``gc_ode_loss`` /
    ``predictor_loss`` (``predictor_objective`` for GC-W v2) when GC-ODE / GC-W are on (with GC-ODE also
    ``gc_ode_gate``, the mean gate ``s_t`` of its pairs at this step).
    """

    def loss_fn(params, rest, images, labels, fusion_breaker):
        model = nnx.merge(graphdef, params, rest, copy=True)
        fb = fusion_breaker if opts.fusion_breaker else None
        if opts.gc_ode:
            logits, aux = model(images, return_aux=True, fusion_breaker=fb)
            aux_loss, gate = aux["gc_ode_loss"], aux.get("gc_ode_gate", jnp.float32(0.0))
        else:
            logits = model(images, fusion_breaker=fb)
            aux_loss = gate = jnp.float32(0.0)
        data_loss = jnp.mean(_per_example_loss(logits, labels, opts))
        total = data_loss + opts.gc_ode_aux_weight * aux_loss
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return total, (data_loss, logits, new_rest, (aux_loss, gate))

    if opts.penalty == "gradient_norm":
        from gcgd_jax.transforms.gradient_norm_penalty import gradient_norm_penalty

        grad_fn = gradient_norm_penalty(
            loss_fn, opts.penalty_radius, opts.penalty_alpha, argnums=0, has_aux=True
        )
    else:
        grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)

    def train_step(state: TrainState, images, labels, fusion_breaker):
        key = jax.random.fold_in(state.rng, state.step)
        x = preprocess(images, opts, key)
        (total, (data_loss, logits, new_rest, (aux_loss, gate))), grads = grad_fn(
            state.params, state.rest, x, labels, fusion_breaker
        )
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params, value=total)
        new_params = optax.apply_updates(state.params, updates)

        # New parameters are checked too: a finite gradient times a huge step can overflow.
        finite = jnp.isfinite(total) & _all_finite(grads) & _all_finite(new_params)
        apply = finite & ~state.halted

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)

        halted = state.halted | (~finite if opts.nan_policy == "stop" else jnp.bool_(False))
        new_state = TrainState(
            params=keep(new_params, state.params),
            rest=keep(new_rest, state.rest),
            opt_state=keep(new_opt_state, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            halted=halted,
        )
        metrics = {
            "loss": data_loss.astype(jnp.float32),
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
            "finite": finite,
            "lr": jnp.asarray(current_lr(new_opt_state), jnp.float32),
        }
        if opts.gc_ode:
            metrics["gc_ode_loss"] = jnp.asarray(aux_loss, jnp.float32)
            metrics["gc_ode_gate"] = jnp.asarray(gate, jnp.float32)
        if opts.gc_w:
            from gcgd_jax.transforms.gc_w import gc_w_predictor_loss

            metrics["predictor_loss"] = gc_w_predictor_loss(new_state.opt_state).astype(jnp.float32)
        if opts.gc_w_v2:
            from gcgd_jax.transforms.gc_w_v2 import gc_w_v2_states

            objectives = [st.objective for st in gc_w_v2_states(new_state.opt_state)]
            metrics["predictor_objective"] = jnp.mean(jnp.stack(objectives)).astype(jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, opts: StepOptions
) -> Callable[..., dict[str, jax.Array]]:
    """The (unjitted) eval step ``(params, rest, images, labels, weights, fusion_breaker)``.

    ``graphdef`` is the model's graph in evaluation mode (BatchNorm running
    averages). ``weights`` (float32, 1 for real examples, 0 for padding) lets
    the last batch be padded to a fixed shape. Returns sums: ``loss_sum``
    (cross-entropy), ``correct``, ``count``.
    """

    def eval_step(params, rest, images, labels, weights, fusion_breaker):
        model = nnx.merge(graphdef, params, rest, copy=True)
        fb = fusion_breaker if opts.fusion_breaker else None
        logits = model(preprocess(images, opts, None), fusion_breaker=fb)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(losses * weights),
            "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights),
        }

    return eval_step
