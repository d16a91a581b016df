"""Training configuration: a frozen dataclass tree read from TOML plus overrides.

A configuration file has one table per section (``[run]``, ``[data]``,
``[model]``, ``[optim]``, ``[loss]``, ``[gradient]``, ``[corrections]``, ``[train]``,
``[checkpoint]``, ``[log]``); every key is optional and defaults to the field's
default below. A top-level ``extends = "name"`` starts from another
configuration file (by name or path) and overrides it key by key.
Per-correction keyword arguments are sub-tables of ``[corrections]``::

    [corrections]
    chain = ["gc_w", "centralize"]
    [corrections.gc_w]
    mask = "pre_downsampling"
    rho = 0.5

Command-line overrides are ``section.key=value`` (``corrections.gc_w.rho=0.3``
for correction options); the value is read as a TOML value when it parses as
one (``0.1``, ``true``, ``[0.5, 0.75]``) and as a bare string otherwise;
``none`` sets an optional field to None; list fields also take ``a,b,c``.
Values are checked against the field's type, then :func:`validate` checks the
whole tree. Every problem raises :class:`ConfigError` with the key's name.

The package is split by job: :mod:`~gcgd_jax.train.config.schema` (the
sections and typed conversion), :mod:`~gcgd_jax.train.config.files` (TOML
files), :mod:`~gcgd_jax.train.config.overrides` (``section.key=value``) and
:mod:`~gcgd_jax.train.config.validate` (whole-tree checks); everything public
is re-exported here. The reading, typing, overriding and writing serve any configuration
of sections (:func:`sections_from_dict`, :func:`sections_to_dict`,
:func:`apply_section_overrides`, :func:`sections_to_toml`): ``gcgd-continual``'s
(:mod:`gcgd_jax.continual.config`) goes through them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gcgd_jax.train.config.files import (
    CONFIG_DIRS,
    find_config,
    read_toml,
    sections_to_toml,
    to_toml,
)
from gcgd_jax.train.config.overrides import apply_overrides, apply_section_overrides
from gcgd_jax.train.config.schema import (
    CIFAR_MODELS,
    CORRECTIONS,
    DATASETS,
    ESTIMATORS,
    GC_ODE_MODES,
    LOSSES,
    MASKS,
    MODELS,
    OPTIMIZERS,
    PENALTIES,
    PERTURBABLE_MODELS,
    RESNET_MODELS,
    SCHEDULES,
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    CorrectionsConfig,
    DataConfig,
    GradientConfig,
    KeyReader,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    TrainLoopConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    flat_config,
    replace_sections,
    sections_from_dict,
    sections_to_dict,
)
from gcgd_jax.train.config.validate import gc_ode_config, ignored_options_note, validate

__all__ = [
    "CIFAR_MODELS",
    "CONFIG_DIRS",
    "CORRECTIONS",
    "DATASETS",
    "ESTIMATORS",
    "GC_ODE_MODES",
    "LOSSES",
    "MASKS",
    "MODELS",
    "OPTIMIZERS",
    "PENALTIES",
    "PERTURBABLE_MODELS",
    "RESNET_MODELS",
    "SCHEDULES",
    "SECTIONS",
    "CheckpointConfig",
    "ConfigError",
    "CorrectionsConfig",
    "DataConfig",
    "GradientConfig",
    "KeyReader",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "apply_section_overrides",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "find_config",
    "flat_config",
    "gc_ode_config",
    "ignored_options_note",
    "load_config",
    "read_toml",
    "replace_sections",
    "sections_from_dict",
    "sections_to_dict",
    "sections_to_toml",
    "to_toml",
    "validate",
]


def load_config(
    name_or_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """Reads a configuration file (or the defaults), applies overrides, validates.

    Args:
        name_or_path: a configuration name (``"quickstart"``; ``./configs`` first, then the
          ones shipped in ``gcgd_jax/configs``) or a path
          to a TOML file; None starts from the dataclass defaults.
        overrides: ``"section.key=value"`` strings, applied in order.

    Returns:
        A validated :class:`TrainConfig`.
    """
    data = {} if name_or_path is None else read_toml(find_config(name_or_path))
    cfg = config_from_dict(apply_overrides(data, overrides))
    validate(cfg)
    return cfg
