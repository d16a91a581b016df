"""Training configuration: a frozen dataclass tree read from TOML plus overrides.

A configuration file has one table per section (``[run]``, ``[data]``,
``[model]``, ``[optim]``, ``[loss]``, ``[corrections]``, ``[train]``,
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
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_DIRS",
    "CheckpointConfig",
    "ConfigError",
    "CorrectionsConfig",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "find_config",
    "flat_config",
    "ignored_options_note",
    "load_config",
    "to_toml",
    "validate",
]

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "synthetic")
MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50")
CIFAR_MODELS = ("resnet20", "resnet32", "resnet56")
CORRECTIONS = (
    "gc_w",
    "centralize",
    "channel_directed_h0",
    "channel_directed_sobolev",
    "znorm",
    "agr",
    "gc_w_v2",
    "mars_correction",
    "grokfast_ema",
)
MASKS = ("all", "all_kernels", "pre_downsampling", "pre_downsampling_block")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "constant")


class ConfigError(ValueError):
    """A configuration that cannot be read or is not valid."""


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Run identity and hardware."""

    name: str = "run"  # label written into the metrics
    seed: int = 0  # model init, data order, augmentation
    out_dir: str = "runs/default"  # the CLI's --out replaces it
    # data-parallel devices per process (its local devices); None = all of them
    num_devices: int | None = None
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    fusion_breaker: str = "auto"  # "auto" (on for CPU), "on", "off"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data set, batching, augmentation and splits."""

    name: str = "cifar10"  # one of DATASETS
    data_dir: str | None = None  # passed to gcgd_jax.data.load_dataset
    cache_dir: str | None = None  # decoded-image cache; None = $GCGD_CACHE_DIR or ~/.cache
    download: bool = False  # let tensorflow-datasets download (needs a network)
    batch_size: int = 128  # global batch (all devices together)
    eval_batch_size: int | None = None  # None = batch_size
    augment: str = "auto"  # "auto" (crop_flip for CIFAR, none otherwise), "crop_flip", "none"
    crop_padding: int = 4  # crop_flip: zero padding before the random crop
    train_subset: int | None = None  # use this many training examples (stratified)
    test_subset: int | None = None  # evaluate on this many test examples (stratified)
    val_fraction: float = 0.0  # carve this fraction of train off as a validation split
    eval_split: str = "test"  # "test" or "val"
    seed: int = 0  # synthetic data, subsets and validation split (fixed across run seeds)
    synthetic_train_size: int = 512  # data.name = "synthetic": examples in train
    synthetic_test_size: int = 128  # ... and in test
    synthetic_image_shape: tuple[int, ...] = (32, 32, 3)  # [height, width, channels]
    synthetic_num_classes: int = 10  # labels 0 .. n-1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and GC-ODE."""

    name: str = "resnet20"  # one of MODELS
    num_classes: int | None = None  # None = the data set's
    in_channels: int | None = None  # None = the data set's
    small_stem: bool = False  # resnet18/34/50 only: 3x3 stem without max-pool
    # Last BatchNorm scale of each residual block starts at zero (Goyal et al. 2017).
    # Off by default, as in He et al. 2016 (the CIFAR ResNets) and torchvision.
    zero_init_residual: bool = False  # each block's last BatchNorm scale starts at 0
    gc_ode: str = "none"  # "none", "gradient", "branch"; controls "scale_only", "frozen_branch"
    gc_ode_solver: str = "euler"  # "euler", "heun", "tsit5"
    gc_ode_steps: int = 1  # fixed solver steps over t in [0, 1]
    gc_ode_width: int | None = None  # None = the model's default
    gc_ode_aux_weight: float = 1.0  # weight of the GC-ODE auxiliary loss (gradient mode)
    gc_ode_gate_max: float = 0.5  # largest share of the branch in the mixed gradient
    gc_ode_control_scale: float = 1.0  # "scale_only": factor of the stage-input gradient


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Base optimizer, learning-rate schedule and weight decay."""

    name: str = "sgd"  # "sgd", "adam", "adamw"
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    b1: float = 0.9  # adam/adamw
    b2: float = 0.999  # adam/adamw
    eps: float = 1e-8  # adam/adamw
    weight_decay: float = 0.0  # coupled L2 for sgd/adam, decoupled for adamw
    weight_decay_on: str = "all"  # "all" parameters or only "kernels" (ndim >= 2)
    schedule: str = "step"  # "step", "cosine", "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)  # step: fractions of the training steps
    decay_factor: float = 0.1  # step: lr multiplier at each milestone
    final_lr_fraction: float = 0.0  # cosine: final lr / peak lr
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training loss and the gradient-norm penalty."""

    name: str = "ce"  # "ce" or "powergrad"
    powergrad_alpha: float = 0.25  # powergrad: exponent in [0, 1]
    penalty: str = "none"  # "none" or "gradient_norm"
    penalty_radius: float = 0.1  # gradient_norm: finite-difference radius
    penalty_alpha: float = 0.8  # gradient_norm: weight of the penalty gradient


@dataclasses.dataclass(frozen=True)
class CorrectionsConfig:
    """Gradient corrections placed before the base optimizer, in order."""

    chain: tuple[str, ...] = ()  # names from CORRECTIONS, applied in this order
    after_weight_decay: bool = False  # True: corrections also see the weight-decay term
    # [corrections.<name>] keyword arguments; ignored (with a note) for names not in chain
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """Length of training and failure policy."""

    epochs: int = 1  # passes over the training set
    total_steps: int | None = None  # when set, replaces epochs (the last epoch may be partial)
    budget: float = 1.0  # scales the number of steps, and with it the lr schedule
    nan_policy: str = "stop"  # "stop" (checkpoint last good state, exit) or "skip"
    eval_every_epochs: int = 1  # evaluate every n epochs (and always after the last)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under <out>/checkpoints."""

    enabled: bool = True  # false: no checkpoints, so no --resume
    every_epochs: int = 1  # 0 = not at epoch ends
    every_steps: int = 0  # 0 = off
    keep: int = 2  # newest checkpoints kept


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress display and metric sinks (metrics.jsonl is always written)."""

    progress: bool = True  # progress bars (train and evaluation) on stderr
    # TensorBoard event files in <out>/tensorboard: pip install "gcgd-jax[tensorboard]"
    tensorboard: bool = False
    tensorboard_every_steps: int = 10  # per-step scalars every this many steps (0 = epochs only)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    corrections: CorrectionsConfig = dataclasses.field(default_factory=CorrectionsConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def replace(self, **sections: Any) -> TrainConfig:
        """``dataclasses.replace`` on sections: ``cfg.replace(optim={"lr": 0.05})``."""
        updates = {}
        for name, values in sections.items():
            current = getattr(self, name)
            updates[name] = (
                dataclasses.replace(current, **values) if isinstance(values, dict) else values
            )
        return dataclasses.replace(self, **updates)


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)

# --------------------------------------------------------------------------- typing


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/converts ``value`` to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return value
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # switches such as fusion_breaker = true
            return "on" if value else "off"
        if isinstance(value, (int, float)):  # e.g. run.name=123 on the command line
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if cls is CorrectionsConfig and key not in hints:
            # [corrections.<name>] sub-tables are keyword arguments of that correction.
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"corrections.{key}: expected a table of keyword arguments for correction "
                    f"{key!r}, got {value!r}"
                )
            kwargs.setdefault("options", {})[key] = dict(value)
            continue
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}" + _suggest(key, list(hints)))
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Builds (and type-checks, but does not :func:`validate`) a config from nested dicts."""
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]" + _suggest(name, list(SECTIONS)))
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{name}] must be a table, got {values!r}")
        sections[name] = _build_section(SECTIONS[name], values, name)
    return TrainConfig(**sections)


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples as lists), the inverse of :func:`config_from_dict`."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {k: dict(v) for k, v in value.items()}
            values[f.name] = value
        out[name] = values
    return out


# --------------------------------------------------------------------------- files


def _package_config_dir() -> Path:
    """The configurations shipped inside the package (``gcgd_jax/configs``)."""
    return Path(str(importlib.resources.files("gcgd_jax") / "configs"))


# Looked up by name, in order: ``./configs`` (a user's own), then the shipped ones.
CONFIG_DIRS: tuple[Path, ...] = (Path("configs"), _package_config_dir())


def find_config(name_or_path: str | Path) -> Path:
    """Resolves a configuration name (``quickstart``) or a path to a TOML file."""
    candidate = Path(name_or_path)
    tried = []
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        tried.append(candidate)
    for folder in CONFIG_DIRS:
        tried.append(
            folder / f"{candidate.name}.toml"
            if candidate.suffix != ".toml"
            else folder / candidate.name
        )
    for path in tried:
        if path.is_file():
            return path
    available = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(
        f"configuration {str(name_or_path)!r} not found (tried {', '.join(map(str, dict.fromkeys(tried)))}); "
        f"available: {', '.join(available) or 'none'}"
    )


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(
            f"configuration {path} extends itself (cycle: {' -> '.join(map(str, seen))})"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path}: {err}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a configuration name or path, got {parent!r}")
    parent_path = Path(parent)
    if not parent_path.is_absolute() and (path.parent / f"{parent}.toml").is_file():
        parent_path = path.parent / f"{parent}.toml"
    elif not parent_path.is_absolute() and (path.parent / parent).is_file():
        parent_path = path.parent / parent
    else:
        parent_path = find_config(parent)
    return _merge(_read_toml(parent_path, (*seen, path)), data)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings to nested dicts (before typing)."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"override {item!r}: the key must be section.key (e.g. optim.lr=0.05)"
            )
        if parts[0] not in SECTIONS:
            raise ConfigError(
                f"override {item!r}: unknown section {parts[0]!r}"
                + _suggest(parts[0], list(SECTIONS))
            )
        if len(parts) > (3 if parts[0] == "corrections" else 2):
            raise ConfigError(f"override {item!r}: too many dots in the key")
        node = data.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a table")
        node[parts[-1]] = _parse_value(text.strip())
    return data


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
    data = {} if name_or_path is None else _read_toml(find_config(name_or_path))
    cfg = config_from_dict(apply_overrides(data, overrides))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- checks


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _choice(problems: list[str], key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        problems.append(f"{key}: unknown value {value!r}" + _suggest(value, allowed))


def validate(cfg: TrainConfig) -> None:
    """Raises :class:`ConfigError` listing every invalid setting of ``cfg``."""
    p: list[str] = []
    run, data, model, optim = cfg.run, cfg.data, cfg.model, cfg.optim
    loss, corr, train, ckpt = cfg.loss, cfg.corrections, cfg.train, cfg.checkpoint

    _choice(p, "run.fusion_breaker", run.fusion_breaker, ("auto", "on", "off"))
    _check(
        p,
        run.num_devices is None or run.num_devices >= 1,
        "run.num_devices: must be >= 1 (or none for all)",
    )
    _check(p, bool(run.out_dir), "run.out_dir: must not be empty")

    _choice(p, "data.name", data.name, DATASETS)
    _check(p, data.batch_size >= 1, f"data.batch_size: must be >= 1, got {data.batch_size}")
    _check(
        p,
        data.eval_batch_size is None or data.eval_batch_size >= 1,
        f"data.eval_batch_size: must be >= 1, got {data.eval_batch_size}",
    )
    _choice(p, "data.augment", data.augment, ("auto", "crop_flip", "none"))
    _check(p, data.crop_padding >= 0, f"data.crop_padding: must be >= 0, got {data.crop_padding}")
    for key in ("train_subset", "test_subset"):
        value = getattr(data, key)
        _check(p, value is None or value >= 1, f"data.{key}: must be >= 1 (or none), got {value}")
    _check(
        p,
        0.0 <= data.val_fraction < 1.0,
        f"data.val_fraction: must be in [0, 1), got {data.val_fraction}",
    )
    _choice(p, "data.eval_split", data.eval_split, ("test", "val"))
    _check(
        p,
        data.eval_split != "val" or data.val_fraction > 0.0,
        "data.eval_split = 'val' needs data.val_fraction > 0",
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

    _choice(p, "model.name", model.name, MODELS)
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
    _choice(
        p,
        "model.gc_ode",
        model.gc_ode,
        ("none", "gradient", "branch", "scale_only", "frozen_branch"),
    )
    _check(
        p, model.gc_ode_steps >= 1, f"model.gc_ode_steps: must be >= 1, got {model.gc_ode_steps}"
    )
    _check(
        p, model.gc_ode_width is None or model.gc_ode_width >= 1, "model.gc_ode_width: must be >= 1"
    )
    _check(p, model.gc_ode_aux_weight >= 0.0, "model.gc_ode_aux_weight: must be >= 0")

    _choice(p, "optim.name", optim.name, OPTIMIZERS)
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
    _choice(p, "optim.weight_decay_on", optim.weight_decay_on, ("all", "kernels"))
    _choice(p, "optim.schedule", optim.schedule, SCHEDULES)
    ms = optim.milestones
    _check(
        p,
        all(0.0 < m < 1.0 for m in ms) and list(ms) == sorted(set(ms)),
        f"optim.milestones: fractions of training in (0, 1), increasing; got {list(ms)}",
    )
    _check(p, 0.0 < optim.decay_factor <= 1.0, "optim.decay_factor: must be in (0, 1]")
    _check(p, 0.0 <= optim.final_lr_fraction <= 1.0, "optim.final_lr_fraction: must be in [0, 1]")
    _check(p, optim.warmup_epochs >= 0.0, "optim.warmup_epochs: must be >= 0")

    _choice(p, "loss.name", loss.name, ("ce", "powergrad"))
    _check(p, 0.0 <= loss.powergrad_alpha <= 1.0, "loss.powergrad_alpha: must be in [0, 1]")
    _choice(p, "loss.penalty", loss.penalty, ("none", "gradient_norm"))
    _check(p, loss.penalty_radius > 0.0, "loss.penalty_radius: must be > 0")
    _check(p, 0.0 <= loss.penalty_alpha <= 1.0, "loss.penalty_alpha: must be in [0, 1]")

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
                + _suggest(name, CORRECTIONS)
            )
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
    _choice(p, "train.nan_policy", train.nan_policy, ("stop", "skip"))
    _check(p, train.eval_every_epochs >= 1, "train.eval_every_epochs: must be >= 1")

    _check(p, ckpt.every_epochs >= 0, "checkpoint.every_epochs: must be >= 0")
    _check(p, ckpt.every_steps >= 0, "checkpoint.every_steps: must be >= 0")
    _check(p, ckpt.keep >= 1, "checkpoint.keep: must be >= 1")
    _check(
        p, cfg.log.tensorboard_every_steps >= 0, "log.tensorboard_every_steps: must be >= 0"
    )

    if p:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(p))


def ignored_options_note(cfg: TrainConfig) -> str | None:
    """A one-line note naming correction options that are ignored (their correction is not
    in ``corrections.chain``), or None when every option is used."""
    chain = cfg.corrections.chain
    unused = [name for name in cfg.corrections.options if name not in chain]
    if not unused:
        return None
    names = ", ".join(f"[corrections.{name}]" for name in unused)
    return f"note: ignoring the options {names}: not in corrections.chain {list(chain)}"


# --------------------------------------------------------------------------- output


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: TrainConfig) -> str:
    """The configuration as TOML text that :func:`load_config` reads back equal.

    Optional fields that are None are left out (None is their default).
    """
    lines: list[str] = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        options = values.pop("options", None) if section == "corrections" else None
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for name, kwargs in (options or {}).items():
            lines.append(f"[corrections.{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in kwargs.items())
            lines.append("")
    return "\n".join(lines)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """``{"section.key": value}`` of every setting."""
    return {f"{s}.{k}": v for s, values in config_to_dict(cfg).items() for k, v in values.items()}


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    fa, fb = flat_config(a), flat_config(b)
    return [key for key in fa if fa[key] != fb[key]]
