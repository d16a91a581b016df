"""The continual-learning configuration: a frozen dataclass tree read from TOML plus overrides.

One table per section (``[run]``, ``[tasks]``, ``[train]``, ``[method]``,
``[checkpoint]``); every key is optional and defaults to GEM's protocol on Permuted
MNIST (Lopez-Paz and Ranzato 2017, their ``run_experiments.sh``): 20 tasks of 1,000
training images, an MLP with two hidden layers of 100 units, batch 10, one epoch a
task, SGD with learning rate 0.1, 256 memories a task. A method's keyword arguments
are the ``[method.options]`` table::

    [method]
    name = "layerwise_decomposition"
    [method.options]
    memory_strength = 0.5

Command-line overrides are ``section.key=value`` (``method.options.eps=0.001`` for an
option), read as in ``gcgd-train``: a TOML value when the text parses as one, a bare
string otherwise, ``none`` for an optional field; ``extends = "path"`` at the top of a
file starts from another file. :func:`validate` checks the whole tree from the numbers
alone, before any data is read, and raises one :class:`~gcgd_jax.train.config.ConfigError`
whose message is one line listing every problem.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from gcgd_jax import methods
from gcgd_jax.train.config import (
    ConfigError,
    apply_section_overrides,
    read_toml,
    replace_sections,
    sections_from_dict,
    sections_to_dict,
    sections_to_toml,
)
from gcgd_jax.train.config.schema import suggest

__all__ = [
    "BENCHMARKS",
    "GROUPINGS",
    "METHODS",
    "Benchmark",
    "CheckpointSection",
    "ContinualConfig",
    "MethodSection",
    "RunSection",
    "TasksSection",
    "TrainSection",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "to_toml",
    "validate",
]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A task sequence built from one image data set (see :mod:`gcgd_jax.continual.tasks`)."""

    name: str
    dataset: str  # the gcgd_jax.data name it reads
    train_size: int  # images in the data set's train split (the official release)
    test_size: int  # ... and in its test split
    summary: str


#: The task sequences, by name.
BENCHMARKS: Mapping[str, Benchmark] = {
    "permuted_mnist": Benchmark(
        "permuted_mnist",
        "mnist",
        60_000,
        10_000,
        "MNIST with one fixed random permutation of the 784 pixels per task",
    ),
    "rotated_mnist": Benchmark(
        "rotated_mnist",
        "mnist",
        60_000,
        10_000,
        "MNIST rotated by one fixed angle per task (task t: drawn in the t-th of num_tasks "
        "equal parts of [min_rotation, max_rotation), as GEM's data script)",
    ),
}

#: ``method.name`` values: plain SGD, then the registry's continual-learning methods.
METHODS: tuple[str, ...] = ("sgd", *methods.config_values("continual"))

#: ``method.groups``: how the layerwise decomposition groups the MLP's parameters.
#: ``"layer"``: each dense layer's kernel and bias together (the paper's layers);
#: ``"leaf"``: every parameter tensor alone (the transform's default); ``"official"``: the
#: authors' code, five consecutive tensors in PyTorch's order (W1 b1 W2 b2 W3 | b3 ...).
GROUPINGS: tuple[str, ...] = ("layer", "leaf", "official")


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Run identity."""

    name: str = "continual"  # label written into the metrics
    seed: int = 0  # model initialisation; also the tasks' draws unless tasks.seed is set
    out_dir: str = "runs/continual"  # the CLI's --out replaces it


@dataclasses.dataclass(frozen=True)
class TasksSection:
    """The task sequence."""

    benchmark: Literal["permuted_mnist", "rotated_mnist"] = "permuted_mnist"
    num_tasks: int = 20
    samples_per_task: int = 1000  # training images drawn for each task (one epoch)
    test_samples: int | None = None  # test images per task (the same ones); None = all
    data_dir: str | None = None  # MNIST's IDX files; None = GCGD_DATA_DIR or the defaults
    seed: int | None = None  # permutations, angles, samples and their order; None = run.seed
    min_rotation: float = 0.0  # rotated_mnist: degrees, counter-clockwise
    max_rotation: float = 180.0  # rotated_mnist (GEM's run_experiments.sh: 0 to 180)
    angles: tuple[float, ...] = ()  # rotated_mnist: one angle per task instead of the draws


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Model, optimizer and episodic memory."""

    hidden: tuple[int, ...] = (100, 100)  # MLP hidden widths (ReLU)
    batch_size: int = 10
    lr: float = 0.1  # plain SGD after the correction
    memory_size: int = 256  # memories per task (GEM's ring buffer)
    eval_batch_size: int = 10_000  # test images per forward pass in the evaluation


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """The correction chained before SGD."""

    name: str = "sgd"  # one of METHODS ("sgd": no correction, no memory gradients)
    groups: str = "layer"  # layerwise decomposition only: one of GROUPINGS
    # [method.options]: keyword arguments of the method's factory (its defaults otherwise)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints under <out>/checkpoints, one after every task."""

    enabled: bool = True  # false: no checkpoints, so no --resume
    keep: int = 2  # newest checkpoints kept


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    """The whole continual-learning configuration."""

    run: RunSection = dataclasses.field(default_factory=RunSection)
    tasks: TasksSection = dataclasses.field(default_factory=TasksSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    method: MethodSection = dataclasses.field(default_factory=MethodSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)

    def replace(self, **sections: Any) -> ContinualConfig:
        """``dataclasses.replace`` on sections: ``cfg.replace(train={"lr": 0.05})``."""
        return replace_sections(self, sections)


SECTIONS: dict[str, type] = typing.get_type_hints(ContinualConfig)


# ----------------------------------------------------------------------------- dicts
# Read, typed and written as gcgd-train's configuration is (gcgd_jax.train.config).


def config_from_dict(data: Mapping[str, Any]) -> ContinualConfig:
    """Builds (and type-checks, but does not :func:`validate`) a config from nested dicts."""
    return ContinualConfig(**sections_from_dict(data, SECTIONS))


def config_to_dict(cfg: ContinualConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples as lists), the inverse of :func:`config_from_dict`."""
    return sections_to_dict(cfg)


def to_toml(cfg: ContinualConfig) -> str:
    """The configuration as TOML text that :func:`load_config` reads back equal (optional
    fields that are None are left out: None is their default)."""
    return sections_to_toml(config_to_dict(cfg), tables=("method.options",))


def _key_problem(parts: list[str]) -> str | None:
    """``section.key``, or ``method.options.<keyword>`` for a method's option."""
    if len(parts) != (3 if parts[:2] == ["method", "options"] else 2) or not all(parts):
        return "the key must be section.key (e.g. train.lr=0.05) or method.options.<keyword>"
    return None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings (``method.options.key=value``) to nested dicts."""
    return apply_section_overrides(data, overrides, SECTIONS, _key_problem)


# ----------------------------------------------------------------------------- checks


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate(cfg: ContinualConfig) -> None:
    """Raises :class:`~gcgd_jax.train.config.ConfigError` listing every invalid setting
    (one line). Reads no data: the sizes of the data set are its official ones, and the
    data actually found is checked again when it is read."""
    p: list[str] = []
    run, tasks, train, method = cfg.run, cfg.tasks, cfg.train, cfg.method
    _check(p, bool(run.out_dir), "run.out_dir: must not be empty")
    _check(p, run.seed >= 0, f"run.seed: must be >= 0, got {run.seed}")
    if tasks.benchmark not in BENCHMARKS:
        p.append(
            f"tasks.benchmark: unknown value {tasks.benchmark!r}"
            + suggest(tasks.benchmark, list(BENCHMARKS))
        )
        bench = None
    else:
        bench = BENCHMARKS[tasks.benchmark]
    _check(
        p,
        tasks.num_tasks >= 2,
        f"tasks.num_tasks: must be >= 2 (BWT and FWT compare tasks), got {tasks.num_tasks}",
    )
    _check(p, tasks.samples_per_task >= 1, "tasks.samples_per_task: must be >= 1")
    if bench is not None:
        _check(
            p,
            tasks.samples_per_task <= bench.train_size,
            f"tasks.samples_per_task: {tasks.samples_per_task} is more than the "
            f"{bench.train_size:,} training images of {bench.dataset}",
        )
        _check(
            p,
            tasks.test_samples is None or 1 <= tasks.test_samples <= bench.test_size,
            f"tasks.test_samples: must be in [1, {bench.test_size:,}] (the test images of "
            f"{bench.dataset}) or none, got {tasks.test_samples}",
        )
    _check(p, tasks.seed is None or tasks.seed >= 0, "tasks.seed: must be >= 0 (or none)")
    if tasks.angles:
        _check(
            p,
            tasks.benchmark == "rotated_mnist",
            "tasks.angles: only for tasks.benchmark = 'rotated_mnist'",
        )
        _check(
            p,
            len(tasks.angles) == tasks.num_tasks,
            f"tasks.angles: {len(tasks.angles)} angles for tasks.num_tasks = "
            f"{tasks.num_tasks} tasks: give one angle per task",
        )
    _check(
        p,
        tasks.min_rotation <= tasks.max_rotation,
        "tasks.min_rotation: must be <= tasks.max_rotation",
    )

    _check(
        p,
        len(train.hidden) >= 1 and all(h >= 1 for h in train.hidden),
        f"train.hidden: one or more widths >= 1, got {list(train.hidden)}",
    )
    _check(p, train.batch_size >= 1, f"train.batch_size: must be >= 1, got {train.batch_size}")
    _check(
        p,
        train.batch_size < 1 or tasks.samples_per_task % train.batch_size == 0,
        f"tasks.samples_per_task = {tasks.samples_per_task} is not a multiple of "
        f"train.batch_size = {train.batch_size} (every step takes a full batch)",
    )
    _check(p, train.lr > 0.0, f"train.lr: must be > 0, got {train.lr}")
    _check(p, train.eval_batch_size >= 1, "train.eval_batch_size: must be >= 1")
    if train.memory_size < 1:
        p.append(f"train.memory_size: must be >= 1 (memories per task), got {train.memory_size}")
    elif train.memory_size > tasks.samples_per_task:
        p.append(
            f"train.memory_size: {train.memory_size} memories per task but a task has only "
            f"tasks.samples_per_task = {tasks.samples_per_task} examples"
        )
    # With memory_size <= samples_per_task, a multiple of batch_size, GEM's ring buffer
    # fills every slot of every task (tests/continual/test_tasks.py checks it).

    if method.name not in METHODS:
        p.append(f"method.name: unknown value {method.name!r}" + suggest(method.name, METHODS))
    else:
        _check(
            p,
            method.groups in GROUPINGS,
            f"method.groups: unknown value {method.groups!r}" + suggest(method.groups, GROUPINGS),
        )
        if method.options:
            if method.name == "sgd":
                p.append("method.options: plain SGD takes no options")
            else:
                known = [
                    k
                    for k in methods.by_value("continual", method.name).option_names()
                    if k != "groups"
                ]
                for key in method.options:
                    if key not in known:
                        p.append(
                            f"method.options: unknown option {key!r} of {method.name}"
                            + (" (set method.groups instead)" if key == "groups" else "")
                            + suggest(key, known)
                        )
    _check(p, cfg.checkpoint.keep >= 1, "checkpoint.keep: must be >= 1")
    if p:
        raise ConfigError("invalid configuration: " + "; ".join(p))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ContinualConfig:
    """Reads a TOML file (or the defaults), applies overrides, validates.

    Args:
        path: a TOML file (``extends`` is followed); None starts from the defaults
          (GEM's protocol on Permuted MNIST, plain SGD).
        overrides: ``"section.key=value"`` strings, applied in order.

    Returns:
        A validated :class:`ContinualConfig`.
    """
    if path is None:
        data: dict[str, Any] = {}
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file {path} not found")
        data = read_toml(path)
    cfg = config_from_dict(apply_overrides(data, overrides))
    validate(cfg)
    return cfg
