"""The continual-learning configuration (:mod:`gcgd_jax.continual.config`)."""

from __future__ import annotations

import pytest

from gcgd_jax import methods
from gcgd_jax.continual.config import METHODS, ContinualConfig, load_config, to_toml
from gcgd_jax.train.config import ConfigError


def test_the_defaults_are_gems_protocol():
    cfg = load_config(None)
    assert cfg == ContinualConfig()
    assert (cfg.tasks.benchmark, cfg.tasks.num_tasks, cfg.tasks.samples_per_task) == (
        "permuted_mnist",
        20,
        1000,
    )
    assert (cfg.train.hidden, cfg.train.batch_size, cfg.train.lr, cfg.train.memory_size) == (
        (100, 100),
        10,
        0.1,
        256,
    )


def test_the_methods_are_sgd_and_the_registrys_continual_methods():
    registered = tuple(m.value for m in methods.methods_of_kind("continual"))
    assert METHODS[0] == "sgd" and METHODS[1:] == registered
    for name in METHODS[1:]:
        assert methods.get(name).select == (f"method.name={name}",)
        assert load_config(None, methods.get(name).select).method.name == name


def test_toml_round_trip_and_extends(tmp_path):
    overrides = [
        "run.seed=3",
        "tasks.benchmark=rotated_mnist",
        "tasks.num_tasks=3",
        "tasks.angles=[10, 20.5, 30]",
        "tasks.test_samples=500",
        "tasks.seed=7",
        "train.hidden=64,64",
        "method.name=layerwise_decomposition",
        "method.groups=official",
        "method.options.memory_strength=0.25",
        "method.options.num_components=2",
        "checkpoint.enabled=false",
    ]
    cfg = load_config(None, overrides)
    assert cfg.tasks.angles == (10.0, 20.5, 30.0) and cfg.train.hidden == (64, 64)
    path = tmp_path / "a.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    child = tmp_path / "b.toml"
    child.write_text('extends = "a.toml"\n[train]\nlr = 0.05\n')
    assert load_config(child) == cfg.replace(train={"lr": 0.05})
    assert load_config(path, ["tasks.test_samples=none"]).tasks.test_samples is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "is not of the form section.key=value"),
        ("train.lr.x=1", "the key must be section.key"),
        ("method.options=1", "the key must be section.key"),
        ("tasks.num_tasks=2.5", "tasks.num_tasks: expected an integer"),
        ("checkpoint.enabled=maybe", "checkpoint.enabled: expected true or false"),
        ("tasks.benchmark=split_mnist", "tasks.benchmark: unknown value 'split_mnist'"),
        ("tasks.angles=[1, 2, 3]", "tasks.angles: only for tasks.benchmark = 'rotated_mnist'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        load_config(None, [override])


def test_options_of_the_whole_network_control():
    """The control fixes layerwise=False: it is not an option there, nor are groups."""
    with pytest.raises(ConfigError, match="unknown option 'layerwise'"):
        load_config(
            None, ["method.name=layerwise_decomposition_whole", "method.options.layerwise=true"]
        )
    with pytest.raises(ConfigError, match=r"unknown option 'groups'.*set method\.groups"):
        load_config(None, ["method.name=layerwise_decomposition", "method.options.groups=5"])
