"""The optimizer a configuration names: corrections, weight decay, base optimizer, schedule.

Order of the chain (``corrections.after_weight_decay = false``, the default)::

    corrections (in the order listed) -> gradient scale -> coupled weight decay
    -> base optimizer

so every correction sees the raw gradient of the training loss. This is our
choice: it keeps the signal a correction (and GC-W's predictor) works on the
same whatever the weight decay, and makes corrections comparable with each
other. Gradient centralization's official SGD code centres *after* the L2 term
is added; ``after_weight_decay = true`` reproduces that order
(weight decay -> corrections -> base optimizer). With ``adamw`` the decay is
decoupled (inside ``optax.adamw``) and the corrections always precede it.

Corrections by name: the ``"transform"`` methods of :mod:`gcgd_jax.methods`
(keyword arguments from ``[corrections.<name>]``; the registry names each
one's factory, fixed arguments and default mask).

Every correction also takes ``mask``: ``"all"`` (every parameter; the
correction's own leaf rules apply), ``"all_kernels"`` (leaves with ndim >= 2:
dense, grouped dense and conv kernels), ``"pre_downsampling"`` / ``"pre_downsampling_block"``
(:func:`gcgd_jax.models.pre_downsampling_mask` with ``whole_block`` False /
True). Each method's registry entry gives its default (GC-W v1 and v2:
``"pre_downsampling"``; the others ``"all"``). Seeded methods (GC-W v1 and
v2) take ``key``, defaulting to the run's seed.

``optim.gradient_scale_params`` names top-level parameter groups (e.g. a
LocalMixer's ``readout``) whose gradient is multiplied by
``optim.gradient_scale`` after the corrections and before the weight decay, as
Ren et al.'s code scales its read-out's gradient by ``last_layer_lr`` (0.1);
with plain SGD this is a smaller learning rate for those parameters' loss term.

The base optimizer is wrapped in :func:`optax.inject_hyperparams`, so the
learning rate of the last update is in the state (:func:`current_lr`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from gcgd_jax import methods
from gcgd_jax.train.config import ConfigError, OptimConfig, TrainConfig

__all__ = [
    "OptimizerBundle",
    "build_correction",
    "build_optimizer",
    "build_schedule",
    "current_lr",
    "kernel_mask",
    "top_level_mask",
]


@dataclasses.dataclass(frozen=True)
class OptimizerBundle:
    """What :func:`build_optimizer` returns."""

    tx: optax.GradientTransformation  # the whole chain
    schedule: optax.Schedule  # lr as a function of the optimizer step
    total_steps: int
    warmup_steps: int


def kernel_mask(params: Any) -> Any:
    """True on every leaf with ndim >= 2 (dense, grouped dense, 2-D conv kernels; biases and
    normalisation scales are 1-D): the "all_kernels" mask and ``weight_decay_on = "kernels"``."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def top_level_mask(params: Any, names: tuple[str, ...]) -> Any:
    """True on the leaves under the top-level keys ``names`` of ``params``; a
    :class:`ConfigError` naming the known keys when one is missing."""

    def top(path: tuple) -> str:
        return str(getattr(path[0], "key", path[0]))

    known = list(
        dict.fromkeys(top(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
    )
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(
            f"optim.gradient_scale_params: no parameters named {missing}; the model's "
            f"top-level parameters are {known}"
        )
    return jax.tree_util.tree_map_with_path(lambda path, _: top(path) in names, params)


def _mask_for(kind: str, params: Any, model: Any) -> Any | None:
    if kind == "all":
        return None
    if kind == "all_kernels":
        return kernel_mask(params)
    from gcgd_jax.models import pre_downsampling_mask

    return pre_downsampling_mask(model, whole_block=kind == "pre_downsampling_block")


def build_correction(
    name: str, options: dict[str, Any], *, params: Any, model: Any, seed: int = 0
) -> optax.GradientTransformation:
    """One registered correction with its keyword arguments and mask (see module doc)."""
    method = methods.METHODS.get(name)
    if method is None or method.kind != "transform":
        known = ", ".join(m.name for m in methods.methods_of_kind("transform"))
        raise ConfigError(f"unknown correction {name!r}; known: {known}")
    factory: Callable[..., optax.GradientTransformation] = method.load()
    fixed = dict(method.fixed)
    kwargs = dict(options)
    mask_kind = kwargs.pop("mask", method.mask)
    if method.seeded:
        kwargs.setdefault("key", seed)
    known = method.option_names()
    for key in kwargs:
        if key not in known:
            raise ConfigError(
                f"corrections.{name}: unknown option {key!r}; known: {', '.join(known)}"
            )
    try:
        tx = factory(**fixed, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"corrections.{name}: {err}") from None
    mask = _mask_for(mask_kind, params, model)
    return tx if mask is None else optax.masked(tx, mask)


def build_schedule(optim: OptimConfig, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The learning rate per optimizer step: warm-up then step/cosine/linear/constant.

    Step decay multiplies the rate by ``decay_factor`` at each milestone, a
    fraction of ``total_steps`` (He et al: ÷10 at 50% and 75%), so scaling the
    number of steps (``train.budget``) scales the milestones with it.
    """
    lr = optim.lr
    main_steps = max(total_steps - warmup_steps, 1)
    if optim.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif optim.schedule == "linear":
        main = optax.linear_schedule(lr, lr * optim.final_lr_fraction, main_steps)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, main_steps, alpha=optim.final_lr_fraction)
    else:
        boundaries = {
            max(round(m * total_steps) - warmup_steps, 0): optim.decay_factor
            for m in optim.milestones
        }
        main = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def _base_optimizer(optim: OptimConfig, schedule: optax.Schedule, wd_mask: Any):
    if optim.name == "sgd":
        return optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))(
            learning_rate=schedule, momentum=optim.momentum or None, nesterov=optim.nesterov
        )
    if optim.name == "adam":
        return optax.inject_hyperparams(optax.adam)(
            learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps
        )
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=wd_mask,
    )


def build_optimizer(
    cfg: TrainConfig, *, params: Any, model: Any, total_steps: int, steps_per_epoch: int
) -> OptimizerBundle:
    """The optimizer of ``cfg`` for ``params`` (an ``nnx.State`` of ``nnx.Param``).

    Args:
        cfg: the configuration (its ``optim`` and ``corrections`` sections).
        params: the parameter tree the optimizer will see (masks are built on it).
        model: the model (for the pre-down-sampling mask).
        total_steps: training steps of the whole run (after ``train.budget``).
        steps_per_epoch: to convert ``optim.warmup_epochs`` into steps.
    """
    optim, corr = cfg.optim, cfg.corrections
    warmup_steps = min(round(optim.warmup_epochs * steps_per_epoch), total_steps)
    schedule = build_schedule(optim, total_steps, warmup_steps)
    wd_mask = kernel_mask(params) if optim.weight_decay_on == "kernels" else None
    corrections = [
        build_correction(
            name, corr.options.get(name, {}), params=params, model=model, seed=cfg.run.seed
        )
        for name in corr.chain
    ]
    decay = []
    if optim.name != "adamw" and optim.weight_decay > 0.0:
        decay = [optax.add_decayed_weights(optim.weight_decay, mask=wd_mask)]
    scale = []
    if optim.gradient_scale_params:
        mask = top_level_mask(params, optim.gradient_scale_params)
        scale = [optax.masked(optax.scale(optim.gradient_scale), mask)]
    if corr.after_weight_decay:
        parts = [*scale, *decay, *corrections]
    else:
        parts = [*corrections, *scale, *decay]
    tx = optax.chain(*parts, _base_optimizer(optim, schedule, wd_mask))
    return OptimizerBundle(
        tx=tx, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps
    )


def current_lr(opt_state: Any) -> jax.Array:
    """The learning rate of the last update, read from the base optimizer's state."""
    return opt_state[-1].hyperparams["learning_rate"]
