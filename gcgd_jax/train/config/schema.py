"""The configuration schema: sections as frozen dataclasses, typed conversion from dicts.

Each section is a frozen dataclass whose fields are the keys of its TOML
table; a field's annotation is its type (``Literal`` for fixed choices, checked
by :func:`gcgd_jax.train.config.validate`), its default the documented
default. Options whose values come from the method registry
(``corrections.chain``, ``loss.name``, ``loss.penalty``, ``model.gc_ode.mode``,
``gradient.estimator``) are plain strings checked against :mod:`gcgd_jax.methods`. Two fields are
tables of another object's keyword arguments: ``[corrections.<name>]``
(the correction's options) and ``[model.gc_ode]``
(:class:`gcgd_jax.models.GCODEConfig`'s fields, its defaults the only ones).

The typed conversion serves any configuration of this shape (a frozen dataclass of
sections): :func:`sections_from_dict`, :func:`sections_to_dict` and
:func:`replace_sections` also read and write :mod:`gcgd_jax.continual.config`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from gcgd_jax import methods

DatasetName = Literal["cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "synthetic"]
ModelName = Literal[
    "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50", "mlp", "local_mixer"
]
OptimizerName = Literal["sgd", "adam", "adamw"]
Schedule = Literal["step", "cosine", "linear", "constant"]
Switch = Literal["auto", "on", "off"]
Augment = Literal["auto", "crop_flip", "none"]
ReplicaStrategy = Literal["auto", "vmap", "unroll"]

DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
MODELS: tuple[str, ...] = typing.get_args(ModelName)
CIFAR_MODELS = ("resnet20", "resnet32", "resnet56")
RESNET_MODELS: tuple[str, ...] = tuple(m for m in MODELS if m.startswith("resnet"))
# Models whose pre-activations the activity-space estimators can perturb
# (gcgd_jax.estimators.ActivityPerturbable).
PERTURBABLE_MODELS = ("mlp", "local_mixer")
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
# Registry-driven choices (see gcgd_jax.methods).
CORRECTIONS: tuple[str, ...] = methods.config_values("transform")
LOSSES: tuple[str, ...] = ("ce", *methods.config_values("loss"))
PENALTIES: tuple[str, ...] = ("none", *methods.config_values("gradient"))
GC_ODE_MODES: tuple[str, ...] = ("none", *methods.config_values("model"))
ESTIMATORS: tuple[str, ...] = ("backprop", *methods.config_values("estimator"))
MASKS: tuple[str, ...] = methods.MASKS


class ConfigError(ValueError):
    """A configuration that cannot be read or is not valid."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Run identity and hardware."""

    name: str = "run"  # label written into the metrics
    seed: int = 0  # model init, data order, augmentation
    out_dir: str = "runs/default"  # the CLI's --out replaces it
    # data-parallel devices per process (its local devices); None = all of them
    num_devices: int | None = None
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    fusion_breaker: Switch = "auto"  # "auto" (on for CPU), "on", "off"
    # seed-parallel training: train one independent replica per seed in one jitted step,
    # into <out_dir>/s<seed>/ (each a complete single run with run.seed = seed); () = one run
    seeds: tuple[int, ...] = ()
    # how the replicas share the step: "vmap" (batched over a leading replica axis),
    # "unroll" (one copy of the step per replica in one program); "auto": unroll on CPU
    replica_strategy: ReplicaStrategy = "auto"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data set, batching, augmentation and splits."""

    name: DatasetName = "cifar10"  # one of DATASETS
    data_dir: str | None = None  # passed to gcgd_jax.data.load_dataset
    cache_dir: str | None = None  # decoded-image cache; None = $GCGD_CACHE_DIR or ~/.cache
    download: bool = False  # let tensorflow-datasets download (needs a network)
    batch_size: int = 128  # global batch (all devices together)
    eval_batch_size: int | None = None  # None = batch_size
    augment: Augment = "auto"  # "auto": crop_flip for CIFAR, none otherwise
    crop_padding: int = 4  # crop_flip: zero padding before the random crop
    train_subset: int | None = None  # use this many training examples (stratified)
    test_subset: int | None = None  # evaluate on this many test examples (stratified)
    val_fraction: float = 0.0  # carve this fraction of train off as a validation split
    eval_split: Literal["test", "val"] = "test"  # the split evaluated each epoch
    seed: int = 0  # synthetic data, subsets and validation split (fixed across run seeds)
    synthetic_train_size: int = 512  # data.name = "synthetic": examples in train
    synthetic_test_size: int = 128  # ... and in test
    synthetic_image_shape: tuple[int, ...] = (32, 32, 3)  # [height, width, channels]
    synthetic_num_classes: int = 10  # labels 0 .. n-1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and GC-ODE."""

    name: ModelName = "resnet20"  # one of MODELS
    num_classes: int | None = None  # None = the data set's
    in_channels: int | None = None  # None = the data set's
    # mlp only: the hidden layers' widths (gcgd_jax.models.MLP; ReLU between them)
    hidden_features: tuple[int, ...] = (256, 256)
    # local_mixer only: a size of Ren et al.'s Table 2 (gcgd_jax.models.LocalMixer), "S/1/1",
    # "M/1/16" (MNIST), "M/8/16" (CIFAR-10) or "L/32/64"
    mixer: str = "M/1/16"
    # local_mixer only: train with local losses (blockwise, patchwise, groupwise); false: the
    # read-out's loss through every block (Ren et al.'s "BP", "FG-W", "FG-A" rows)
    local_losses: bool = True
    small_stem: bool = False  # resnet18/34/50 only: 3x3 stem without max-pool
    # Last BatchNorm scale of each residual block starts at zero (Goyal et al. 2017).
    # Off by default, as in He et al. 2016 (the CIFAR ResNets) and torchvision.
    zero_init_residual: bool = False  # each block's last BatchNorm scale starts at 0
    # per-sample normalised backward gradient at every residual block output (Cabana et al.)
    backward_grad_norm: bool = False
    # [model.gc_ode]: keyword arguments of gcgd_jax.models.GCODEConfig (mode, solver, steps,
    # width, gate_max, aux_weight, ...; its defaults); GC-ODE is on when `mode` names a model
    # method of gcgd_jax.methods ("gradient", "branch", ...), off when absent or "none"
    gc_ode: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def gc_ode_mode(self) -> str:
        """``model.gc_ode.mode``, ``"none"`` when GC-ODE is off."""
        return str(self.gc_ode.get("mode", "none"))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Base optimizer, learning-rate schedule and weight decay."""

    name: OptimizerName = "sgd"  # base optimizer
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    b1: float = 0.9  # adam/adamw
    b2: float = 0.999  # adam/adamw
    eps: float = 1e-8  # adam/adamw
    weight_decay: float = 0.0  # coupled L2 for sgd/adam, decoupled for adamw
    weight_decay_on: Literal["all", "kernels"] = "all"  # "kernels": ndim >= 2 only
    schedule: Schedule = "step"  # learning-rate schedule after warm-up
    milestones: tuple[float, ...] = (0.5, 0.75)  # step: fractions of the training steps
    decay_factor: float = 0.1  # step: lr multiplier at each milestone
    final_lr_fraction: float = 0.0  # cosine, linear: final lr / peak lr
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr
    # the gradient of these top-level parameters (e.g. ["readout"]) is multiplied by
    # gradient_scale after the corrections, before weight decay and the base optimizer
    # (Ren et al.'s code: the read-out's gradient times last_layer_lr = 0.1)
    gradient_scale_params: tuple[str, ...] = ()
    gradient_scale: float = 1.0  # the factor for gradient_scale_params


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training loss and the gradient-norm penalty."""

    name: str = "ce"  # "ce" or a loss method of gcgd_jax.methods ("powergrad")
    powergrad_alpha: float = 0.25  # powergrad: exponent in [0, 1]
    penalty: str = "none"  # "none" or a gradient method of gcgd_jax.methods ("gradient_norm")
    penalty_radius: float = 0.1  # gradient_norm: finite-difference radius
    penalty_alpha: float = 0.8  # gradient_norm: weight of the penalty gradient


@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """How the gradient is computed: backpropagation, or a forward-mode estimate."""

    # "backprop" or an estimator method of gcgd_jax.methods ("weight_perturbation",
    # "activity_perturbation", "guess_transpose", "guess_activation_mixing")
    estimator: str = "backprop"
    num_directions: int = 1  # estimators: K, the directions (jax.jvp passes) averaged per step
    # weight_perturbation on a local_mixer with local losses: a dense channel layer's unit is
    # credited with its group's loss ("group", the official code; biased) or its block's
    channel_credit: Literal["group", "block"] = "group"
    mask_inactive: bool = True  # activity estimators: no estimate on inactive ReLU units


@dataclasses.dataclass(frozen=True)
class CorrectionsConfig:
    """Gradient corrections placed before the base optimizer, in order."""

    chain: tuple[str, ...] = ()  # transform methods of gcgd_jax.methods, in this order
    after_weight_decay: bool = False  # True: corrections also see the weight-decay term
    # [corrections.<name>] keyword arguments; ignored (with a note) for names not in chain
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """Length of training and failure policy."""

    epochs: int = 1  # passes over the training set
    total_steps: int | None = None  # when set, replaces epochs (the last epoch may be partial)
    budget: float = 1.0  # scales the number of steps, and with it the lr schedule
    nan_policy: Literal["stop", "skip"] = "stop"  # stop: checkpoint last good state, exit
    eval_every_epochs: int = 1  # evaluate every n epochs (and always after the last)
    # with data.eval_split = "val": also evaluate the test split once, after the last step
    # (summary record: final_test_loss, final_test_acc); the epochs see validation only
    final_test: bool = False


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
    gradient: GradientConfig = dataclasses.field(default_factory=GradientConfig)
    corrections: CorrectionsConfig = dataclasses.field(default_factory=CorrectionsConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def replace(self, **sections: Any) -> TrainConfig:
        """``dataclasses.replace`` on sections: ``cfg.replace(optim={"lr": 0.05})``."""
        return replace_sections(self, sections)


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)

# ------------------------------------------------------------------------ any configuration
# A configuration is a frozen dataclass of sections, each a frozen dataclass of typed keys.
# What follows serves any such tree: gcgd-train's (TrainConfig) and gcgd-continual's
# (gcgd_jax.continual.config.ContinualConfig) are read, typed and replaced by it.

_Tree = typing.TypeVar("_Tree")


def replace_sections(cfg: _Tree, sections: Mapping[str, Any]) -> _Tree:
    """``dataclasses.replace`` on a tree's sections: a dict updates a section's keys,
    anything else replaces the section."""
    updates = {
        name: dataclasses.replace(getattr(cfg, name), **values)
        if isinstance(values, dict)
        else values
        for name, values in sections.items()
    }
    return dataclasses.replace(cfg, **updates)


def parse_value(text: str) -> Any:
    """An override's value: a TOML value when it parses as one, else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def suggest(name: str, known: Sequence[str]) -> str:
    """The tail of an "unknown name" error: the closest known name, then every known one."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks/converts ``value`` to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is typing.Literal:
        # Membership is checked by validate() with the other choices, so that one
        # error lists every problem; here the value only has to be a string.
        return coerce(value, str, key)
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
            value = [parse_value(v.strip()) for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


#: A section's own reading of some of its keys, tried before the generic one:
#: ``read_key(key, value, kwargs)`` puts the key into ``kwargs`` (the section's keyword
#: arguments) and returns True, raises :class:`ConfigError`, or returns False to leave
#: the key to the generic check (a field of the section, its value coerced to the field's
#: type).
KeyReader = typing.Callable[[str, Any, dict[str, Any]], bool]


def _build_section(
    cls: type, values: Mapping[str, Any], section: str, read_key: KeyReader | None = None
) -> Any:
    """One section (the dataclass ``cls``) from its table, every value coerced to its
    field's type; ``read_key`` reads the section's special keys first."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if read_key is not None and read_key(key, value, kwargs):
            continue
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}" + suggest(key, list(hints)))
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def sections_from_dict(
    data: Mapping[str, Any],
    sections: Mapping[str, type],
    key_readers: Mapping[type, KeyReader] | None = None,
) -> dict[str, Any]:
    """The sections named in ``data``, every value coerced to its field's type: the keyword
    arguments of the configuration class (the sections not named keep their defaults).

    Args:
        data: ``{section: {key: value}}``, as read from TOML.
        sections: the configuration's sections, name -> dataclass (``SECTIONS``).
        key_readers: a section class's :data:`KeyReader`, for sections with sub-tables.
    """
    built = {}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]" + suggest(name, list(sections)))
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{name}] must be a table, got {values!r}")
        cls = sections[name]
        built[name] = _build_section(cls, values, name, (key_readers or {}).get(cls))
    return built


def sections_to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """A configuration (a dataclass of section dataclasses) as nested plain dicts: tuples
    as lists, tables (and tables in them) as dicts; the inverse of :func:`sections_from_dict`."""
    out: dict[str, dict[str, Any]] = {}
    for field in dataclasses.fields(cfg):
        section = getattr(cfg, field.name)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):  # [model.gc_ode], [corrections.<name>] tables
                value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
            values[f.name] = value
        out[field.name] = values
    return out


# ------------------------------------------------------------------------ gcgd-train's sections


#: The flat ``model.gc_ode_*`` keys of earlier versions (now keys of ``[model.gc_ode]``).
_OLD_GC_ODE_KEYS = (
    "gc_ode_solver",
    "gc_ode_steps",
    "gc_ode_width",
    "gc_ode_aux_weight",
    "gc_ode_gate_max",
    "gc_ode_control_scale",
    "gc_ode_sobolev_weight",
    "gc_ode_loss_subsample",
)


def _gc_ode_table(value: Any) -> dict[str, Any]:
    """``[model.gc_ode]`` typed by :class:`gcgd_jax.models.GCODEConfig`'s fields (its
    values are checked by constructing it, in :func:`gcgd_jax.train.config.validate`)."""
    from gcgd_jax.models.gc_ode.config import GCODEConfig

    if isinstance(value, str):
        raise ConfigError(
            f"model.gc_ode: is a table of GC-ODE settings, got {value!r}: write "
            f'[model.gc_ode] mode = "{value}" in a file, model.gc_ode.mode={value} on the '
            "command line"
        )
    if not isinstance(value, Mapping):
        raise ConfigError(f"model.gc_ode: expected a table of GC-ODE settings, got {value!r}")
    hints = typing.get_type_hints(GCODEConfig)
    table: dict[str, Any] = {}
    for key, item in value.items():
        if key not in hints:
            raise ConfigError(
                f"unknown key model.gc_ode.{key} (a GCODEConfig field)" + suggest(key, list(hints))
            )
        tp = str if key == "mode" else hints[key]  # "none" (off) is not a GCODEConfig mode
        table[key] = coerce(item, tp, f"model.gc_ode.{key}")
    if table.get("mode", "none") != "none":  # on: every setting, GCODEConfig's defaults filled in
        defaults = {f.name: f.default for f in dataclasses.fields(GCODEConfig)}
        table = {**defaults, **table}
    return table


def _read_model_key(key: str, value: Any, kwargs: dict[str, Any]) -> bool:
    """``[model]``: the old flat ``gc_ode_*`` keys are refused, ``gc_ode`` is a table."""
    if key in _OLD_GC_ODE_KEYS:
        new_key = key.removeprefix("gc_ode_")
        raise ConfigError(
            f"model.{key}: GC-ODE's settings are the [model.gc_ode] table's keys now: "
            f"write {new_key} = ... under [model.gc_ode] (command line: "
            f"model.gc_ode.{new_key}=...)"
        )
    if key == "gc_ode":
        kwargs[key] = _gc_ode_table(value)
        return True
    return False


_CORRECTIONS_FIELDS = typing.get_type_hints(CorrectionsConfig)


def _read_corrections_key(key: str, value: Any, kwargs: dict[str, Any]) -> bool:
    """``[corrections.<name>]`` sub-tables are keyword arguments of that correction."""
    if key in _CORRECTIONS_FIELDS:
        return False
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"corrections.{key}: expected a table of keyword arguments for correction "
            f"{key!r}, got {value!r}"
        )
    kwargs.setdefault("options", {})[key] = dict(value)
    return True


_KEY_READERS: dict[type, KeyReader] = {
    ModelConfig: _read_model_key,
    CorrectionsConfig: _read_corrections_key,
}


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Builds (and type-checks, but does not :func:`validate`) a config from nested dicts."""
    return TrainConfig(**sections_from_dict(data, SECTIONS, _KEY_READERS))


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples as lists), the inverse of :func:`config_from_dict`."""
    return sections_to_dict(cfg)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """``{"section.key": value}`` of every setting."""
    return {f"{s}.{k}": v for s, values in config_to_dict(cfg).items() for k, v in values.items()}


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    fa, fb = flat_config(a), flat_config(b)
    return [key for key in fa if fa[key] != fb[key]]
