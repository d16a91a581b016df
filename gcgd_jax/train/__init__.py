"""Training system: configuration, optimizer chain, jitted data-parallel steps, loop, CLI.

Command line: ``gcgd-train --config quickstart --out runs/quickstart`` (see
:mod:`gcgd_jax.train.cli`). From Python::

    from gcgd_jax.train import load_config, train
    cfg = load_config("quickstart", ["optim.lr=0.05"])
    summary = train(cfg, out_dir="runs/x")
"""

from __future__ import annotations

from gcgd_jax._lazy import lazy_exports

# public name -> the module that defines it (imported on first use: the CLI's
# --help must not wait for JAX)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "CheckpointConfig",
            "ConfigError",
            "CorrectionsConfig",
            "DataConfig",
            "GradientConfig",
            "LogConfig",
            "LossConfig",
            "ModelConfig",
            "OptimConfig",
            "RunConfig",
            "TrainConfig",
            "TrainLoopConfig",
            "load_config",
            "to_toml",
            "validate",
        ),
        "gcgd_jax.train.config",
    ),
    **dict.fromkeys(("build_optimizer", "build_schedule", "current_lr"), "gcgd_jax.train.optim"),
    **dict.fromkeys(
        (
            "GradAux",
            "StepOptions",
            "TrainState",
            "make_eval_step",
            "make_grad_fn",
            "make_train_step",
            "make_update_fn",
        ),
        "gcgd_jax.train.step",
    ),
    **dict.fromkeys(("build_model", "load_data", "step_options"), "gcgd_jax.train.build"),
    **dict.fromkeys(
        (
            "CheckpointError",
            "EpochResult",
            "NonFiniteLossError",
            "Trainer",
            "replica_config",
            "replica_dir",
            "train",
        ),
        "gcgd_jax.train.trainer",
    ),
    **dict.fromkeys(("RunFolderBusy", "RunLock"), "gcgd_jax.train.lock"),
    **dict.fromkeys(("CPU_CONV_FLAG", "apply_cpu_flags"), "gcgd_jax.ops.xla_flags"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
