"""Continual learning: task sequences, episodic memories, GEM's metrics, a runner and its CLI.

The continual-learning corrections of :mod:`gcgd_jax.transforms`
(:func:`~gcgd_jax.transforms.layerwise_gradient_decomposition`,
:func:`~gcgd_jax.transforms.gem`, :func:`~gcgd_jax.transforms.agem`, registered in
:mod:`gcgd_jax.methods` under the kind ``"continual"``) need what an ordinary training
run does not have: a sequence of tasks, a memory of each, the old tasks' gradients in
every step and metrics over the whole sequence. This package is that harness, on GEM's
protocol (Lopez-Paz and Ranzato 2017) by default:

* :mod:`~gcgd_jax.continual.config`: :class:`ContinualConfig` (TOML, overrides, checks);
* :mod:`~gcgd_jax.continual.tasks`: Permuted and Rotated MNIST as pixel maps;
* :mod:`~gcgd_jax.continual.memory`: GEM's ring-buffer memories and their gradients;
* :mod:`~gcgd_jax.continual.step`: the MLP, the optimizer chain, the jitted steps;
* :mod:`~gcgd_jax.continual.metrics`: ACC, BWT and FWT of the accuracy matrix;
* :mod:`~gcgd_jax.continual.runner`: :class:`ContinualRunner` (run folder, checkpoints,
  exact resume);
* :mod:`~gcgd_jax.continual.cli`: ``gcgd-continual``.

From Python::

    from gcgd_jax.continual import load_config, run_continual
    cfg = load_config(None, ["method.name=layerwise_decomposition", "run.seed=1"])
    summary = run_continual(cfg, out_dir="runs/lgd-s1")
    summary["acc"], summary["bwt"], summary["matrix"]
"""

from __future__ import annotations

from gcgd_jax._lazy import lazy_exports

# public name -> the module that defines it (imported on first use: the CLI's --help and
# the configuration checks must not wait for JAX)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
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
            "load_config",
            "to_toml",
            "validate",
        ),
        "gcgd_jax.continual.config",
    ),
    **dict.fromkeys(
        ("TaskSequence", "build_tasks", "load_tasks", "rotation_map"), "gcgd_jax.continual.tasks"
    ),
    **dict.fromkeys(
        ("EpisodicMemory", "memory_gradients", "ring_buffer_slots"), "gcgd_jax.continual.memory"
    ),
    **dict.fromkeys(
        ("MLP", "build_correction", "build_model", "make_functions"), "gcgd_jax.continual.step"
    ),
    "continual_metrics": "gcgd_jax.continual.metrics",
    **dict.fromkeys(("ContinualRunner", "run_continual"), "gcgd_jax.continual.runner"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
