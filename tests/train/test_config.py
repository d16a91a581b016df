"""Configuration files, overrides, validation errors and the XLA flag helper (no compiling)."""

import dataclasses

import pytest

from gcgd_jax.train import config as C
from gcgd_jax.train.config import ConfigError, load_config


def test_shipped_configs_load_and_validate():
    quick = load_config("quickstart")
    assert quick.data.name == "fashion_mnist" and quick.model.name == "resnet20"
    assert quick.corrections.chain == ("gc_w",)
    assert quick.corrections.options["gc_w"]["mask"] == "pre_downsampling"
    assert quick.train.epochs == 1

    paper = load_config("cifar10_resnet20")
    assert (paper.optim.name, paper.optim.lr, paper.optim.momentum) == ("sgd", 0.1, 0.9)
    assert paper.optim.weight_decay == 1e-4 and paper.data.batch_size == 128
    assert paper.train.total_steps == 64000 and paper.optim.milestones == (0.5, 0.75)
    assert paper.corrections.chain == () and paper.model.gc_ode_mode == "none"

    gcgd = load_config("cifar10_resnet20_gcgd")  # extends the paper setting
    assert gcgd.train.total_steps == 64000 and gcgd.optim.weight_decay == 1e-4
    assert gcgd.corrections.chain == ("gc_w",) and gcgd.model.gc_ode_mode == "gradient"
    # [model.gc_ode] is GCODEConfig's keyword arguments, its defaults filled in (one source)
    from gcgd_jax.models import GCODEConfig

    assert GCODEConfig(**gcgd.model.gc_ode) == GCODEConfig(mode="gradient")


def test_overrides_are_typed():
    cfg = load_config(
        "quickstart",
        [
            "optim.lr=0.05",
            "data.batch_size=64",
            "corrections.chain=gc_w,centralize",
            "corrections.centralize.conv_only=true",
            "corrections.gc_w.rho=0.3",
            "optim.milestones=[0.3, 0.6]",
            "model.gc_ode.mode=gradient",
            "model.gc_ode.width=16",
            "model.gc_ode.width=none",
            "model.gc_ode.steps=2.0",
            "data.name=cifar10",
            "run.fusion_breaker=off",
        ],
    )
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.corrections.chain == ("gc_w", "centralize")
    assert cfg.corrections.options == {
        "gc_w": {"mask": "pre_downsampling", "warmup": 50, "rho": 0.3},
        "centralize": {"conv_only": True},
    }
    assert cfg.optim.milestones == (0.3, 0.6)
    assert cfg.model.gc_ode["width"] is None and cfg.model.gc_ode["steps"] == 2
    assert isinstance(cfg.model.gc_ode["steps"], int)
    assert cfg.data.name == "cifar10" and cfg.run.fusion_breaker == "off"
    # An integer where a float is expected is accepted and converted.
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown key optim.lrr (did you mean 'lr'?)"),
        ("optimizer.lr=0.1", "unknown section 'optimizer'"),
        ("data.batch_size=abc", "data.batch_size: expected an integer, got 'abc'"),
        ("data.batch_size=0", "data.batch_size: must be >= 1"),
        ("optim.lr=-0.1", "optim.lr: must be > 0"),
        ("optim.lr=0", "optim.lr: must be > 0"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("train.budget=0", "train.budget: must be > 0"),
        ("data.name=cifar11", "data.name: unknown value 'cifar11' (did you mean 'cifar10'?)"),
        ("model.name=resnet21", "model.name: unknown value 'resnet21'"),
        (
            'corrections.chain=["gcw"]',
            "corrections.chain: unknown value 'gcw' (did you mean 'gc_w'?)",
        ),
        ("optim.name=lion", "optim.name: unknown value 'lion'"),
        ("optim.schedule=exponential", "optim.schedule: unknown value 'exponential'"),
        (
            "optim.milestones=[0.75, 0.5]",
            "optim.milestones: fractions of training in (0, 1), increasing",
        ),
        ("data.eval_split=val", "data.eval_split = 'val' needs data.val_fraction > 0"),
        (
            "corrections.gcw.rho=0.3",
            "corrections.gcw: options given for an unknown correction 'gcw' (did you mean 'gc_w'?)",
        ),
        ("train.nan_policy=ignore", "train.nan_policy: unknown value 'ignore'"),
        ("model.gc_ode.mode=branches", "model.gc_ode.mode: unknown value 'branches'"),
        ("model.gc_ode.steps=two", "model.gc_ode.steps: expected an integer, got 'two'"),
        ("model.gc_ode.mode.x=1", "too many dots in the key"),
        ("corrections.gc_w.mask=some", "corrections.gc_w.mask: unknown value 'some'"),
        ("optim.lr", "is not of the form section.key=value"),
        ("lr=0.1", "the key must be section.key"),
    ],
)
def test_bad_settings_raise_clear_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert message in str(err.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=-1", "data.batch_size=0"])
    assert "optim.lr" in str(err.value) and "data.batch_size" in str(err.value)


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(
        ConfigError, match="configuration 'no_such_config' not found.*available: .*quickstart"
    ):
        load_config("no_such_config")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    loop = tmp_path / "loop.toml"
    loop.write_text(f'extends = "{loop}"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(loop)


def test_toml_round_trip(tmp_path):
    cfg = load_config(
        "cifar10_resnet20_gcgd",
        ["corrections.gc_w.rho=0.25", "data.train_subset=100", "model.gc_ode.width=16"],
    )
    path = tmp_path / "config.toml"
    path.write_text(C.to_toml(cfg))
    assert load_config(path) == cfg
    assert C.config_diff(cfg, cfg.replace(optim={"lr": 0.2})) == ["optim.lr"]


def test_defaults_are_documented_in_one_place():
    """The section dataclasses are the one place defaults live and are documented: every
    field carries a comment on (or just above) its line, a configuration without any file
    or override is exactly the dataclass defaults, and the defaults are valid."""
    import inspect
    import re

    undocumented = []
    for section, cls in C.SECTIONS.items():
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            (i,) = [n for n, line in enumerate(lines) if re.match(rf"\s+{f.name}: ", line)]
            if "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
                undocumented.append(f"{section}.{f.name}")
    assert not undocumented, f"fields without a comment: {undocumented}"
    cfg = C.TrainConfig()
    assert load_config(None) == cfg
    assert C.config_from_dict({}) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    C.validate(cfg)


def test_options_of_a_correction_not_in_the_chain_are_ignored_with_a_note():
    """``--config quickstart --set corrections.chain=`` turns GC-W off: its options stay in
    the configuration but are not used, and one line says so."""
    cfg = load_config("quickstart", ["corrections.chain="])
    assert cfg.corrections.chain == () and "gc_w" in cfg.corrections.options
    note = C.ignored_options_note(cfg)
    assert note == "note: ignoring the options [corrections.gc_w]: not in corrections.chain []"
    assert C.ignored_options_note(load_config("quickstart")) is None
    cfg = load_config(None, ["corrections.chain=znorm", "corrections.agr.eps=1e-6"])
    assert "[corrections.agr]" in C.ignored_options_note(cfg)
