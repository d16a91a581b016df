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
a registered loss, plus the model's weighted auxiliary losses, e.g. GC-ODE's; a
model with a ``losses(x, labels)`` method, the LocalMixer, brings its own), its
gradient (or a registered gradient function's, or a forward-mode estimate of it:
``gradient.estimator``) -- :func:`make_grad_fn` --
then the optimizer update -- :func:`make_update_fn` -- and the
non-finite guard: when the loss, any gradient or any updated parameter is
not finite the update is
not applied (parameters, optimizer state and BatchNorm statistics keep their
values) and ``nonfinite`` counts it; under the ``"stop"`` policy ``halted``
is set and every later step is a no-op too, so the state stays at the last
good one until the host notices and stops.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gcgd_jax import methods
from gcgd_jax.estimators.fg_weight import Credited
from gcgd_jax.models.aux import AuxSpec
from gcgd_jax.train.optim import current_lr

__all__ = [
    "GradAux",
    "StepOptions",
    "TrainState",
    "make_eval_step",
    "make_grad_fn",
    "make_train_step",
    "make_update_fn",
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
    """Static settings of the steps (hashable; part of the compiled program).

    ``loss``, ``penalty``, ``estimator`` and ``state_metrics`` name methods of
    :mod:`gcgd_jax.methods` (``"ce"`` / ``"none"`` / ``"backprop"`` / ``()`` for none); their
    keyword arguments are ``(name, value)`` pairs so the options stay hashable.
    ``aux`` says what the step does with the model's auxiliary outputs
    (:mod:`gcgd_jax.models.aux`; GC-ODE's loss, gate and gradient ratio).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_padding: int = 4
    loss: str = "ce"  # "ce" or the value of a "loss" method
    loss_options: tuple[tuple[str, Any], ...] = ()
    penalty: str = "none"  # "none" or the value of a "gradient" method
    penalty_options: tuple[tuple[str, Any], ...] = ()
    # "backprop" or the value of an "estimator" method (gcgd_jax.estimators)
    estimator: str = "backprop"
    estimator_options: tuple[tuple[str, Any], ...] = ()
    # weight_perturbation on a model with per-parameter credits (LocalMixer.weight_credits)
    channel_credit: str = "group"
    # the model's auxiliary losses and metrics (gcgd_jax.models.aux; none by default)
    aux: AuxSpec = dataclasses.field(default_factory=AuxSpec)
    # names of the chain's methods with a state metric (e.g. GC-W's predictor loss)
    state_metrics: tuple[str, ...] = ()
    nan_policy: str = "stop"


class GradAux(NamedTuple):
    """What the gradient function returns beside the gradients (all device arrays)."""

    total_loss: jax.Array  # () the differentiated loss (data loss + weighted auxiliary losses)
    data_loss: jax.Array  # () mean data loss of the batch
    logits: jax.Array  # (batch, classes)
    rest: Any  # the model's non-parameter state after the forward pass (BatchNorm statistics)
    # the model's auxiliary metrics named by StepOptions.aux.metrics, probe metrics
    # included (e.g. gc_ode_loss, gc_ode_gate, gc_ode_grad_ratio); {} without any
    model_aux: dict[str, jax.Array]


def preprocess(images: jax.Array, opts: StepOptions, key: jax.Array | None) -> jax.Array:
    """uint8 NHWC -> float32, augmented when ``key`` is given, normalised."""
    from gcgd_jax.data.augment import normalize, random_crop_flip

    if key is not None and opts.augment:
        images = random_crop_flip(key, images, pad=opts.crop_padding)
    return normalize(images, np.asarray(opts.mean, np.float32), np.asarray(opts.std, np.float32))


def _per_example_loss_fn(opts: StepOptions) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if opts.loss == "ce":
        return optax.softmax_cross_entropy_with_integer_labels
    loss = methods.by_value("loss", opts.loss).load()
    kwargs = dict(opts.loss_options)
    return lambda logits, labels: loss(logits, labels, **kwargs)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# fold_in(augmentation key, this) keys an estimator's directions (the augmentation's own
# key, and with it every backprop run, stays as it was)
ESTIMATOR_STREAM = 0x4647


def own_objective(model: Any) -> bool:
    """Whether ``model`` defines its own training objective: a ``losses(x, labels)`` method
    returning ``.loss`` (the objective), ``.logits`` and ``.final_loss`` (per example), as
    :class:`gcgd_jax.models.LocalMixer` does (its local losses)."""
    return callable(getattr(model, "losses", None))


def _model_kwargs(fusion_breaker: jax.Array | None) -> dict[str, Any]:
    # only the ResNets take the fusion breaker; it is None for every other model
    return {} if fusion_breaker is None else {"fusion_breaker": fusion_breaker}


def make_grad_fn(graphdef: nnx.GraphDef, opts: StepOptions) -> Callable[..., tuple[Any, GradAux]]:
    """The (unjitted) gradient of a train step: ``(state, images, labels, fusion_breaker)
    -> (grads, GradAux)``.

    Exactly what :func:`make_train_step` differentiates: augmentation keyed by
    ``fold_in(state.rng, state.step)``, normalisation, the training-mode
    forward pass, the loss of ``opts`` (cross-entropy or a registered loss, plus
    the model's auxiliary losses weighted by ``opts.aux.loss_weights``) and its
    gradient with respect to ``state.params`` (through ``jax.value_and_grad``
    or the registered gradient function of ``opts.penalty``). Diagnostics call
    it to see the gradient a run's optimizer receives at a given state and
    batch.

    With ``opts.aux.probe`` the model's gradient probe (``model.new_aux_probe()``)
    is differentiated too, and ``model.aux_probe_metrics`` of its gradient joins
    ``GradAux.model_aux`` (GC-ODE's gated modes: ``gc_ode_grad_ratio``).

    With ``opts.estimator`` (``gradient.estimator``) the gradient is a forward-mode
    estimate (:mod:`gcgd_jax.estimators`), keyed by ``fold_in(augmentation key,
    ESTIMATOR_STREAM)`` (so a resumed run draws the same directions):
    weight perturbation differentiates the same loss (with the model's per-parameter
    credits, ``weight_credits``, and its exactly trained heads, ``head_mask``, where it
    has them: the LocalMixer); the activity estimators run on the model itself and one
    more unperturbed forward pass gives the step's logits and data loss.
    """
    per_example_loss = _per_example_loss_fn(opts)

    aux_spec = opts.aux
    metric_names = tuple(name for name, _ in aux_spec.metrics)

    def loss_fn(params, rest, images, labels, fusion_breaker, probe=None, credited=False):
        model = nnx.merge(graphdef, params, rest, copy=True)
        if own_objective(model):
            out = model.losses(images, labels)
            total, data_loss, logits, logged = out.loss, jnp.mean(out.final_loss), out.logits, {}
            if credited:
                credits = model.weight_credits(out, channel_credit=opts.channel_credit)
                total = Credited(out.loss, credits)
        else:
            kwargs = _model_kwargs(fusion_breaker)
            if aux_spec.active:
                if probe is not None:
                    kwargs["aux_probe"] = probe
                logits, aux = model(images, return_aux=True, **kwargs)
            else:
                logits, aux = model(images, **kwargs), {}
            data_loss = jnp.mean(per_example_loss(logits, labels))
            total = data_loss
            for name, weight in aux_spec.loss_weights:
                total = total + weight * aux[name]
            logged = {name: aux[name] for name in metric_names if name in aux}
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return total, (data_loss, logits, new_rest, logged)

    if opts.penalty == "none":
        value_and_grad = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
    else:
        gradient_fn = methods.by_value("gradient", opts.penalty).load()
        value_and_grad = gradient_fn(loss_fn, **dict(opts.penalty_options), argnums=0, has_aux=True)
    with_probe = jax.value_and_grad(
        lambda diff, *args: loss_fn(diff[0], *args, probe=diff[1]), argnums=0, has_aux=True
    )

    def model_of(state: TrainState) -> nnx.Module:
        # Python only (at trace time): the model's probe methods, not its values.
        return nnx.merge(graphdef, state.params, state.rest, copy=True)

    estimate = None if opts.estimator == "backprop" else _estimate_fn(loss_fn, model_of, opts)

    def grad_fn(state: TrainState, images, labels, fusion_breaker):
        key = jax.random.fold_in(state.rng, state.step)
        x = preprocess(images, opts, key)
        if estimate is not None:
            estimator_key = jax.random.fold_in(key, ESTIMATOR_STREAM)
            return estimate(state, x, labels, fusion_breaker, estimator_key)
        args = (state.rest, x, labels, fusion_breaker)
        model = model_of(state) if aux_spec.probe else None
        probe = None if model is None else model.new_aux_probe()
        if probe is None:
            (total, (data_loss, logits, new_rest, logged)), grads = value_and_grad(
                state.params, *args
            )
        else:
            (total, (data_loss, logits, new_rest, logged)), (grads, probe_grad) = with_probe(
                (state.params, probe), *args
            )
            logged = {**logged, **model.aux_probe_metrics(probe_grad)}
        model_aux = {
            name: jnp.asarray(logged[name], jnp.float32) for name in metric_names if name in logged
        }
        return grads, GradAux(total, data_loss, logits, new_rest, model_aux)

    return grad_fn


def _estimate_fn(
    loss_fn: Callable[..., Any], model_of: Callable[[TrainState], Any], opts: StepOptions
) -> Callable[..., tuple[Any, GradAux]]:
    """The gradient of :func:`make_grad_fn` by ``opts.estimator``: ``(state, x, labels,
    fusion_breaker, key) -> (grads, GradAux)`` on a preprocessed batch ``x``."""
    method = methods.by_value("estimator", opts.estimator)
    factory = method.load()
    kwargs = {**method.fixed, **dict(opts.estimator_options)}

    if method.perturbs == "weights":

        def by_weights(state: TrainState, x, labels, fusion_breaker, key):
            model = model_of(state)  # Python only: which credits and exact heads it has
            credited = callable(getattr(model, "weight_credits", None))
            exact = getattr(type(model), "head_mask", None)
            fn = factory(
                functools.partial(loss_fn, credited=credited), has_aux=True, exact=exact, **kwargs
            )
            (total, (data_loss, logits, new_rest, logged)), grads = fn(
                state.params, state.rest, x, labels, fusion_breaker, key=key
            )
            model_aux = {name: jnp.asarray(v, jnp.float32) for name, v in logged.items()}
            return grads, GradAux(total, data_loss, logits, new_rest, model_aux)

        return by_weights

    estimator = factory(**kwargs)

    def by_activities(state: TrainState, x, labels, fusion_breaker, key):
        total, grads = estimator(model_of(state), x, labels, key=key)
        # the step's logits and data loss: the same unperturbed forward pass as backprop's
        _, (data_loss, logits, _, _) = loss_fn(state.params, state.rest, x, labels, fusion_breaker)
        return grads, GradAux(total, data_loss, logits, state.rest, {})

    return by_activities


def make_update_fn(
    tx: optax.GradientTransformation, opts: StepOptions
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) update of a train step: ``(state, grads, aux, labels) -> (state, metrics)``.

    ``tx.update`` (with ``value=aux.total_loss``), ``optax.apply_updates``, the
    non-finite guard (module docstring) and the step's metrics (see
    :func:`make_train_step`).
    """
    metric_methods = [methods.get(name) for name in opts.state_metrics]

    def update_fn(state: TrainState, grads, aux: GradAux, labels):
        updates, new_opt_state = tx.update(
            grads, state.opt_state, state.params, value=aux.total_loss
        )
        new_params = optax.apply_updates(state.params, updates)

        # New parameters are checked too: a finite gradient times a huge step can overflow.
        finite = jnp.isfinite(aux.total_loss) & _all_finite(grads) & _all_finite(new_params)
        apply = finite & ~state.halted

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)

        halted = state.halted | (~finite if opts.nan_policy == "stop" else jnp.bool_(False))
        new_state = TrainState(
            params=keep(new_params, state.params),
            rest=keep(aux.rest, state.rest),
            opt_state=keep(new_opt_state, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            halted=halted,
        )
        metrics = {
            "loss": aux.data_loss.astype(jnp.float32),
            "correct": jnp.sum(jnp.argmax(aux.logits, -1) == labels).astype(jnp.int32),
            "finite": finite,
            "lr": jnp.asarray(current_lr(new_opt_state), jnp.float32),
        }
        metrics.update(aux.model_aux)
        for method in metric_methods:
            value = method.read_state_metric(new_state.opt_state)
            metrics[method.state_metric[0]] = jnp.asarray(value, jnp.float32)
        return new_state, metrics

    return update_fn


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, opts: StepOptions
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) train step ``(state, images, labels, fusion_breaker) -> (state, metrics)``.

    :func:`make_grad_fn` then :func:`make_update_fn`. ``images`` are uint8
    NHWC, ``labels`` int32, ``fusion_breaker`` the float32 scalar 1.0 passed at
    run time that the model divides by to keep XLA's CPU backend from fusing
    across blocks (:func:`gcgd_jax.ops.fusion.fusion_break`), or None for
    none (``run.fusion_breaker``). Metrics (float32/int32
    scalars): ``loss`` (the data loss, mean over the batch), ``correct``
    (count), ``finite``, ``lr``; the model's auxiliary metrics by name
    (``opts.aux``; with GC-ODE ``gc_ode_loss``, ``gc_ode_gate``, the mean gate
    ``s_t`` of its pairs at this step, and in the gated modes
    ``gc_ode_grad_ratio``: :func:`gcgd_jax.models.gc_ode.aux_spec`); and the
    state metric of every method in ``opts.state_metrics`` under its record
    key (GC-W: ``gc_w_predictor_loss``, GC-W v2: ``gc_w_v2_objective``).
    """
    grad_fn = make_grad_fn(graphdef, opts)
    update_fn = make_update_fn(tx, opts)

    def train_step(state: TrainState, images, labels, fusion_breaker):
        grads, aux = grad_fn(state, images, labels, fusion_breaker)
        return update_fn(state, grads, aux, labels)

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
        logits = model(preprocess(images, opts, None), **_model_kwargs(fusion_breaker))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(losses * weights),
            "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights),
        }

    return eval_step
