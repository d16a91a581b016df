"""What a configuration builds: its data sets, its model, its static step options.

These are the pieces :class:`gcgd_jax.train.Trainer` assembles; experiments
that need the same data or model as a run build them here too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from gcgd_jax import methods
from gcgd_jax.models.aux import AuxSpec
from gcgd_jax.train.config import (
    CIFAR_MODELS,
    RESNET_MODELS,
    ConfigError,
    TrainConfig,
    gc_ode_config,
)
from gcgd_jax.train.step import StepOptions

__all__ = ["build_model", "load_data", "model_aux_spec", "step_options"]

# Data sets whose "auto" augmentation is random crop + flip (He et al.'s CIFAR recipe).
_CROP_FLIP_DATASETS = ("cifar10", "cifar100")


def _load_split(cfg: TrainConfig, split: str):
    from gcgd_jax import data as gdata

    d = cfg.data
    if d.name == "synthetic":
        size = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        shape, k = tuple(d.synthetic_image_shape), d.synthetic_num_classes
        return gdata.synthetic_dataset(size, shape, k, seed=d.seed, split=split)
    kwargs = {"data_dir": d.data_dir, "cache_dir": d.cache_dir, "download": d.download}
    return gdata.load_dataset(d.name, split, **kwargs)


def load_data(cfg: TrainConfig):
    """``(train, eval)`` data sets of ``cfg`` (subsets and validation split applied)."""
    from gcgd_jax import data as gdata

    d = cfg.data
    train = _load_split(cfg, "train")
    test = _load_split(cfg, "test") if d.eval_split == "test" else None
    try:
        if d.val_fraction > 0.0:
            train, val = gdata.split_validation(train, d.val_fraction, seed=d.seed)
        eval_ds = val if d.eval_split == "val" else test
        if d.train_subset is not None:
            train = gdata.take(train, d.train_subset, seed=d.seed)
        if d.test_subset is not None:
            eval_ds = gdata.take(eval_ds, d.test_subset, seed=d.seed)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    return train, eval_ds


def load_final_test(cfg: TrainConfig):
    """The test split evaluated once after the last step (``train.final_test``), with
    ``data.test_subset`` applied as to the evaluated split; ``None`` when not asked for."""
    from gcgd_jax import data as gdata

    if not cfg.train.final_test:
        return None
    test = _load_split(cfg, "test")
    if cfg.data.test_subset is not None:
        try:
            test = gdata.take(test, cfg.data.test_subset, seed=cfg.data.seed)
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None
    return test


def step_options(cfg: TrainConfig) -> StepOptions:
    """The static step settings of ``cfg`` (normalisation, augmentation, loss, corrections)."""
    from gcgd_jax.data import normalization

    mean, std = normalization(cfg.data.name)
    augment = cfg.data.augment
    if augment == "auto":
        augment = "crop_flip" if cfg.data.name in _CROP_FLIP_DATASETS else "none"

    def options_of(kind, value: str) -> tuple[tuple[str, Any], ...]:
        return tuple(methods.by_value(kind, value).options_from(cfg.loss).items())

    loss, penalty = cfg.loss.name, cfg.loss.penalty
    estimator = cfg.gradient.estimator
    return StepOptions(
        mean=tuple(float(v) for v in np.ravel(mean)),
        std=tuple(float(v) for v in np.ravel(std)),
        augment=augment == "crop_flip",
        crop_padding=cfg.data.crop_padding,
        loss=loss,
        loss_options=() if loss == "ce" else options_of("loss", loss),
        penalty=penalty,
        penalty_options=() if penalty == "none" else options_of("gradient", penalty),
        estimator=estimator,
        estimator_options=()
        if estimator == "backprop"
        else tuple(methods.by_value("estimator", estimator).options_from(cfg.gradient).items()),
        channel_credit=cfg.gradient.channel_credit,
        aux=model_aux_spec(cfg),
        state_metrics=tuple(
            name for name in cfg.corrections.chain if methods.get(name).state_metric is not None
        ),
        nan_policy=cfg.train.nan_policy,
    )


def build_model(
    cfg: TrainConfig,
    *,
    num_classes: int,
    in_channels: int,
    image_shape: tuple[int, int, int] | None = None,
) -> nnx.Module:
    """The model of ``cfg.model`` (initialised from ``run.seed``); ``image_shape``
    ``(H, W, C)`` is needed by ``mlp`` and ``local_mixer``. With a forward-mode
    ``gradient.estimator`` a ResNet is built with XLA's own convolutions
    (:func:`gcgd_jax.ops.conv.xla_convolutions`)."""
    from gcgd_jax import models

    m = cfg.model
    if m.name not in RESNET_MODELS:
        if image_shape is None:
            raise ValueError(f"build_model: model {m.name!r} needs the image_shape")
        shape = (*image_shape[:2], in_channels)
        rngs = nnx.Rngs(cfg.run.seed)
        if m.name == "mlp":
            size = int(np.prod(shape))
            return models.MLP(size, m.hidden_features, num_classes, rngs=rngs)
        try:
            return models.LocalMixer.from_config(
                m.mixer,
                image_shape=shape,
                num_classes=num_classes,
                local=m.local_losses,
                rngs=rngs,
            )
        except ValueError as err:
            raise ConfigError(f"model.mixer: {err}") from None
    kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "zero_init_residual": m.zero_init_residual,
        "backward_grad_norm": m.backward_grad_norm,
        "rngs": nnx.Rngs(cfg.run.seed),
    }
    if m.name not in CIFAR_MODELS:
        kwargs["small_stem"] = m.small_stem
    kwargs["gc_ode"] = _gc_ode(cfg)
    if cfg.gradient.estimator == "backprop":
        return getattr(models, m.name)(num_classes, **kwargs)
    from gcgd_jax.ops.conv import xla_convolutions

    with xla_convolutions():  # the custom-VJP convolutions cannot be differentiated by jax.jvp
        return getattr(models, m.name)(num_classes, **kwargs)


def _gc_ode(cfg: TrainConfig):
    try:
        return gc_ode_config(cfg)
    except ValueError as err:
        raise ConfigError(f"model.gc_ode: {err}") from None


def model_aux_spec(cfg: TrainConfig) -> AuxSpec:
    """What the train step does with the model's auxiliary outputs (:mod:`gcgd_jax.models.aux`):
    GC-ODE's loss, gate and -- without a gradient penalty, which differentiates the loss
    twice -- its measured gradient ratio; nothing without GC-ODE."""
    from gcgd_jax.models.gc_ode.module import aux_spec

    config = _gc_ode(cfg)
    return AuxSpec() if config is None else aux_spec(config, probe=cfg.loss.penalty == "none")
