"""Whole-configuration checks: every invalid setting is reported at once, by key."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

from gcgd_jax import methods
from gcgd_jax.train.config.schema import (
    CIFAR_MODELS,
    CORRECTIONS,
    ESTIMATORS,
    GC_ODE_MODES,
    LOSSES,
    MASKS,
    PENALTIES,
    PERTURBABLE_MODELS,
    RESNET_MODELS,
    SECTIONS,
    ConfigError,
    TrainConfig,
    suggest,
)

__all__ = ["gc_ode_config", "ignored_options_note", "validate"]


def gc_ode_config(cfg: TrainConfig) -> Any:
    """``GCODEConfig(**cfg.model.gc_ode)``, or ``None`` when GC-ODE is off (``mode``
    absent or ``"none"``); ``ValueError`` from GCODEConfig for invalid settings."""
    from gcgd_jax.models.gc_ode.config import GCODEConfig

    if cfg.model.gc_ode_mode == "none":
        return None
    return GCODEConfig(**cfg.model.gc_ode)


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _choice(problems: list[str], key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        problems.append(f"{key}: unknown value {value!r}" + suggest(value, allowed))


def validate(cfg: TrainConfig) -> None:
    """Raises :class:`ConfigError` listing every invalid setting of ``cfg``."""
    p: list[str] = []
    # Every Literal-typed field: its value must be one of the Literal's strings.
    for section in SECTIONS:
        values = getattr(cfg, section)
        for name, tp in typing.get_type_hints(type(values)).items():
            if typing.get_origin(tp) is typing.Literal:
                _choice(p, f"{section}.{name}", getattr(values, name), typing.get_args(tp))
    run, data, model, optim = cfg.run, cfg.data, cfg.model, cfg.optim
    loss, corr, train, ckpt = cfg.loss, cfg.corrections, cfg.train, cfg.checkpoint

    _check(
        p,
        run.num_devices is None or run.num_devices >= 1,
        "run.num_devices: must be >= 1 (or none for all)",
    )
    _check(p, bool(run.out_dir), "run.out_dir: must not be empty")
    _check(
        p,
        all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in run.seeds),
        f"run.seeds: must be integers >= 0, got {list(run.seeds)}",
    )
    _check(
        p,
        len(set(run.seeds)) == len(run.seeds),
        f"run.seeds: each seed may appear once, got {list(run.seeds)}",
    )
    _check(
        p,
        not (run.seeds and run.distributed),
        "run.seeds: seed-parallel training runs in one process; it cannot be combined with "
        "run.distributed = true (start one process per seed instead)",
    )

    _check(p, data.batch_size >= 1, f"data.batch_size: must be >= 1, got {data.batch_size}")
    _check(
        p,
        data.eval_batch_size is None or data.eval_batch_size >= 1,
        f"data.eval_batch_size: must be >= 1, got {data.eval_batch_size}",
    )
    _check(p, data.crop_padding >= 0, f"data.crop_padding: must be >= 0, got {data.crop_padding}")
    for key in ("train_subset", "test_subset"):
        value = getattr(data, key)
        _check(p, value is None or value >= 1, f"data.{key}: must be >= 1 (or none), got {value}")
    _check(
        p,
        0.0 <= data.val_fraction < 1.0,
        f"data.val_fraction: must be in [0, 1), got {data.val_fraction}",
    )
    _check(
        p,
        data.eval_split != "val" or data.val_fraction > 0.0,
        "data.eval_split = 'val' needs data.val_fraction > 0",
    )
    _check(
        p,
        not cfg.train.final_test or data.eval_split == "val",
        "train.final_test = true needs data.eval_split = 'val' (with the test split evaluated "
        "every epoch, the final evaluation is the test one already)",
    )
    if data.name == "synthetic":
        _check(p, data.synthetic_train_size >= 1, "data.synthetic_train_size: must be >= 1")
        _check(p, data.synthetic_test_size >= 1, "data.synthetic_test_size: must be >= 1")
        _check(p, data.synthetic_num_classes >= 2, "data.synthetic_num_classes: must be >= 2")
        _check(
            p,
            len(data.synthetic_image_shape) == 3
            and all(d >= 1 for d in data.synthetic_image_shape),
            f"data.synthetic_image_shape: expected [height, width, channels], got {list(data.synthetic_image_shape)}",
        )

    _check(
        p, model.num_classes is None or model.num_classes >= 2, "model.num_classes: must be >= 2"
    )
    _check(
        p, model.in_channels is None or model.in_channels >= 1, "model.in_channels: must be >= 1"
    )
    _check(
        p,
        not model.small_stem or model.name not in CIFAR_MODELS,
        f"model.small_stem: only for resnet18/34/50, not {model.name}",
    )
    if model.name not in RESNET_MODELS:
        _check_non_resnet(p, cfg)
    _choice(p, "model.gc_ode.mode", model.gc_ode_mode, GC_ODE_MODES)
    if model.gc_ode_mode in GC_ODE_MODES[1:]:
        try:
            gc_ode_config(cfg)
        except ValueError as err:  # GCODEConfig names the field and the problem
            p.append(f"model.gc_ode: {err}")

    _check(p, optim.lr > 0.0, f"optim.lr: must be > 0, got {optim.lr}")
    _check(
        p, 0.0 <= optim.momentum < 1.0, f"optim.momentum: must be in [0, 1), got {optim.momentum}"
    )
    _check(
        p, 0.0 <= optim.b1 < 1.0 and 0.0 <= optim.b2 < 1.0, "optim.b1, optim.b2: must be in [0, 1)"
    )
    _check(p, optim.eps > 0.0, "optim.eps: must be > 0")
    _check(
        p, optim.weight_decay >= 0.0, f"optim.weight_decay: must be >= 0, got {optim.weight_decay}"
    )
    ms = optim.milestones
    _check(
        p,
        all(0.0 < m < 1.0 for m in ms) and list(ms) == sorted(set(ms)),
        f"optim.milestones: fractions of training in (0, 1), increasing; got {list(ms)}",
    )
    _check(p, 0.0 < optim.decay_factor <= 1.0, "optim.decay_factor: must be in (0, 1]")
    _check(p, 0.0 <= optim.final_lr_fraction <= 1.0, "optim.final_lr_fraction: must be in [0, 1]")
    _check(p, optim.warmup_epochs >= 0.0, "optim.warmup_epochs: must be >= 0")
    _check(p, optim.gradient_scale > 0.0, "optim.gradient_scale: must be > 0")
    _check(
        p,
        optim.gradient_scale == 1.0 or bool(optim.gradient_scale_params),
        "optim.gradient_scale: scales the gradient of optim.gradient_scale_params, which is "
        'empty (name the parameters, e.g. optim.gradient_scale_params=["readout"])',
    )

    _choice(p, "loss.name", loss.name, LOSSES)
    _check(p, 0.0 <= loss.powergrad_alpha <= 1.0, "loss.powergrad_alpha: must be in [0, 1]")
    _choice(p, "loss.penalty", loss.penalty, PENALTIES)
    _check(p, loss.penalty_radius > 0.0, "loss.penalty_radius: must be > 0")
    _check(p, 0.0 <= loss.penalty_alpha <= 1.0, "loss.penalty_alpha: must be in [0, 1]")

    _check_estimator(p, cfg)

    for name in corr.chain:
        _choice(p, "corrections.chain", name, CORRECTIONS)
    dupes = sorted({n for n in corr.chain if corr.chain.count(n) > 1})
    _check(p, not dupes, f"corrections.chain: {', '.join(dupes)} listed more than once")
    for name, options in corr.options.items():
        # Options of a known correction that is not in the chain are ignored (see
        # ignored_options_note), so a chain can be emptied from the command line.
        if name not in CORRECTIONS:
            p.append(
                f"corrections.{name}: options given for an unknown correction {name!r}"
                + suggest(name, CORRECTIONS)
            )
        else:
            known = methods.get(name).option_names()
            for key in options:
                if key not in known:
                    p.append(f"corrections.{name}: unknown option {key!r}" + suggest(key, known))
        mask = options.get("mask")
        if mask is not None:
            _choice(p, f"corrections.{name}.mask", mask, MASKS)

    _check(p, train.epochs >= 1, f"train.epochs: must be >= 1, got {train.epochs}")
    _check(
        p,
        train.total_steps is None or train.total_steps >= 1,
        "train.total_steps: must be >= 1 (or none)",
    )
    _check(p, train.budget > 0.0, f"train.budget: must be > 0, got {train.budget}")
    _check(p, train.eval_every_epochs >= 1, "train.eval_every_epochs: must be >= 1")

    _check(p, ckpt.every_epochs >= 0, "checkpoint.every_epochs: must be >= 0")
    _check(p, ckpt.every_steps >= 0, "checkpoint.every_steps: must be >= 0")
    _check(p, ckpt.keep >= 1, "checkpoint.keep: must be >= 1")
    _check(p, cfg.log.tensorboard_every_steps >= 0, "log.tensorboard_every_steps: must be >= 0")

    if p:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(p))


def _check_non_resnet(p: list[str], cfg: TrainConfig) -> None:
    """The settings of an ``mlp`` or ``local_mixer`` model (and the ResNet-only ones)."""
    from gcgd_jax.data.dataset import SPECS

    model, run = cfg.model, cfg.run
    for key, on in (
        ("zero_init_residual", model.zero_init_residual),
        ("backward_grad_norm", model.backward_grad_norm),
        ("gc_ode", model.gc_ode_mode != "none"),
    ):
        _check(p, not on, f"model.{key}: only for the ResNets, not {model.name}")
    _check(
        p,
        run.fusion_breaker != "on",
        f"run.fusion_breaker = 'on': only the ResNets place it, not {model.name}",
    )
    _check(
        p,
        cfg.loss.name == "ce" or model.name == "mlp",
        f"loss.name: {model.name} trains on its own (local) cross-entropy losses; "
        f"{cfg.loss.name!r} needs another model",
    )
    if model.name == "mlp":
        _check(
            p,
            all(w >= 1 for w in model.hidden_features),
            f"model.hidden_features: widths must be >= 1, got {list(model.hidden_features)}",
        )
        return
    from gcgd_jax.models.local_mixer_config import LOCAL_MIXER_CONFIGS

    if model.mixer not in LOCAL_MIXER_CONFIGS:
        _choice(p, "model.mixer", model.mixer, tuple(LOCAL_MIXER_CONFIGS))
        return
    n = LOCAL_MIXER_CONFIGS[model.mixer].patches_per_side
    data = cfg.data
    if data.name == "synthetic":
        shape = tuple(data.synthetic_image_shape)
    else:
        shape = SPECS[data.name].image_shape if data.name in SPECS else None
    if shape is not None and len(shape) == 3 and (shape[0] % n or shape[1] % n):
        p.append(
            f"model.mixer = {model.mixer!r}: its {n} x {n} patches do not tile "
            f"{data.name}'s {shape[0]} x {shape[1]} images"
        )


def _check_estimator(p: list[str], cfg: TrainConfig) -> None:
    """``[gradient]``: the estimator, its settings and what it cannot be combined with."""
    g, model = cfg.gradient, cfg.model
    _choice(p, "gradient.estimator", g.estimator, ESTIMATORS)
    _check(
        p, g.num_directions >= 1, f"gradient.num_directions: must be >= 1, got {g.num_directions}"
    )
    if g.estimator not in ESTIMATORS[1:]:
        return
    method = methods.by_value("estimator", g.estimator)
    name = f"gradient.estimator = {g.estimator!r}"
    _check(
        p,
        cfg.loss.penalty == "none",
        f"{name}: a forward-mode estimate cannot be combined with loss.penalty = "
        f"{cfg.loss.penalty!r} (it differentiates the loss in reverse mode)",
    )
    _check(
        p,
        model.gc_ode_mode == "none" and not model.backward_grad_norm,
        f"{name}: GC-ODE and model.backward_grad_norm change the backward pass, which an "
        "estimator does not take",
    )
    if method.perturbs != "activities":
        return
    if model.name not in PERTURBABLE_MODELS:
        p.append(
            f"{name}: perturbs pre-activations, which {model.name} does not expose; use "
            f"model.name = {' or '.join(repr(m) for m in PERTURBABLE_MODELS)} "
            "(or gradient.estimator = 'weight_perturbation', which works on any model)"
        )
        return
    _check(
        p,
        cfg.loss.name == "ce",
        f"{name}: the model's own cross-entropy is the loss; loss.name = {cfg.loss.name!r} "
        "needs gradient.estimator = 'backprop' or 'weight_perturbation'",
    )
    downstream = method.fixed.get("family") in ("transpose", "activation_mixing")
    _check(
        p,
        not downstream or model.name == "mlp",
        f"{name}: guesses from the next layer (downstream()), which only model.name = 'mlp' "
        f"has, not {model.name}",
    )


def ignored_options_note(cfg: TrainConfig) -> str | None:
    """A one-line note naming correction options that are ignored (their correction is not
    in ``corrections.chain``), or None when every option is used."""
    chain = cfg.corrections.chain
    unused = [name for name in cfg.corrections.options if name not in chain]
    if not unused:
        return None
    names = ", ".join(f"[corrections.{name}]" for name in unused)
    return f"note: ignoring the options {names}: not in corrections.chain {list(chain)}"
