"""Training system: configuration, optimizer chain, jitted data-parallel steps, loop, CLI.

Command line: ``gcgd-train --config quickstart --out runs/quickstart`` (see
:mod:`gcgd_jax.train.cli`). From Python::

    from gcgd_jax.train import load_config, train
    cfg = load_config("quickstart", ["optim.lr=0.05"])
    summary = train(cfg, out_dir="runs/x")
"""

from gcgd_jax.train.config import (
    CheckpointConfig,
    ConfigError,
    CorrectionsConfig,
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    TrainLoopConfig,
    load_config,
    to_toml,
    validate,
)
from gcgd_jax.train.optim import build_optimizer, build_schedule, current_lr
from gcgd_jax.train.step import StepOptions, TrainState, make_eval_step, make_train_step
from gcgd_jax.train.trainer import (
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    build_model,
    load_data,
    step_options,
    train,
)
from gcgd_jax.cpu_speed import CPU_CONV_FLAG, apply_cpu_flags

__all__ = [
    "CPU_CONV_FLAG",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigError",
    "CorrectionsConfig",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "StepOptions",
    "TrainConfig",
    "TrainLoopConfig",
    "TrainState",
    "Trainer",
    "apply_cpu_flags",
    "build_model",
    "build_optimizer",
    "build_schedule",
    "current_lr",
    "load_config",
    "load_data",
    "make_eval_step",
    "make_train_step",
    "step_options",
    "to_toml",
    "train",
    "validate",
]
