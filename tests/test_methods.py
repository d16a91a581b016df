"""The method registry (:mod:`gcgd_jax.methods`): every entry is consistent, exercised by
its kind's conformance tests, runnable from the command line and documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from gcgd_jax import methods
from gcgd_jax.continual.cli import main as continual_main
from gcgd_jax.continual.config import METHODS as CONTINUAL_METHODS
from gcgd_jax.continual.config import load_config as load_continual_config
from gcgd_jax.train.cli import main
from gcgd_jax.train.config import (
    CORRECTIONS,
    ESTIMATORS,
    GC_ODE_MODES,
    LOSSES,
    PENALTIES,
    ConfigError,
    load_config,
)
from gcgd_jax.train.report import read_metrics
from tests.continual.test_conformance import FACTORIES as CONTINUAL_FACTORIES
from tests.continual.tiny import tiny_args, write_tiny_mnist
from tests.train.test_cli import TINY
from tests.transforms.test_conformance import CASES

ROOT = Path(__file__).resolve().parents[1]
ALL = list(methods.METHODS.values())


def _ids(entries):
    return [m.name for m in entries]


def test_names_are_unique_and_kinds_known():
    assert len({m.name for m in ALL}) == len(ALL)
    for m in ALL:
        kinds = ("transform", "loss", "gradient", "estimator", "model", "combination", "continual")
        assert m.kind in kinds, m
        assert m.summary and m.reference, f"{m.name}: summary and reference are required"
        if m.kind == "combination":
            assert m.parts and all(p in methods.METHODS for p in m.parts), m
        elif m.kind != "model":
            assert m.factory is not None and m.value is not None, m


def test_config_choices_come_from_the_registry():
    assert tuple(m.value for m in methods.methods_of_kind("transform")) == CORRECTIONS
    assert ("ce", *(m.value for m in methods.methods_of_kind("loss"))) == LOSSES
    assert ("none", *(m.value for m in methods.methods_of_kind("gradient"))) == PENALTIES
    assert ("backprop", *(m.value for m in methods.methods_of_kind("estimator"))) == ESTIMATORS
    assert (
        "none",
        *(m.value for m in methods.methods_of_kind("model") if m.value is not None),
    ) == GC_ODE_MODES
    assert ("sgd", *(m.value for m in methods.methods_of_kind("continual"))) == CONTINUAL_METHODS


def test_a_chain_entry_is_the_name_of_its_method():
    """``corrections.chain`` entries are looked up in the registry by name
    (``gcgd_jax.train.optim.build_correction``), so a transform's value is its name, and
    every other kind's value leads back to exactly one method."""
    for m in methods.methods_of_kind("transform"):
        assert m.value == m.name, m
        assert methods.get(m.value) is m and methods.by_value("transform", m.value) is m
    for kind in ("loss", "gradient", "estimator", "model"):
        for m in methods.methods_of_kind(kind):
            if m.value is not None:
                assert methods.by_value(kind, m.value) is m, m


def test_transform_options_are_their_factory_keywords():
    for m in methods.methods_of_kind("transform"):
        names = m.option_names()
        assert names[-1] == "mask" and not set(names) & set(m.fixed), m.name
        assert ("key" in names) == m.seeded, m.name
    with pytest.raises(ValueError, match="takes no corrections options"):
        methods.get("powergrad").option_names()


def test_lookups_name_the_known_methods():
    assert methods.get("gc_w").kind == "transform"
    with pytest.raises(KeyError, match="unknown method 'gcw'; known: gc_w"):
        methods.get("gcw")
    assert methods.by_value("gradient", "gradient_norm").name == "gradient_norm_penalty"
    with pytest.raises(KeyError, match="no loss method with value 'focal'"):
        methods.by_value("loss", "focal")


# An estimator that perturbs activities needs a model that exposes them (gcgd_jax.estimators)
ESTIMATOR_MODEL = {"estimator": ("model.name=mlp",)}


@pytest.mark.parametrize("method", ALL, ids=_ids(ALL))
def test_every_entry_selects_a_valid_configuration(method):
    if method.kind == "continual":  # the continual-learning runner's configuration
        assert load_continual_config(None, list(method.select)).method.name == method.value
        return
    cfg = load_config("quickstart", [*ESTIMATOR_MODEL.get(method.kind, ()), *method.select])
    if method.kind == "transform":
        assert cfg.corrections.chain == (method.value,)
    if method.kind == "combination":
        for part in method.parts:
            for override in methods.get(part).select:
                key, value = override.split("=", 1)
                if key == "corrections.chain":
                    assert value in cfg.corrections.chain
                elif key.startswith("model.gc_ode."):  # a key of the [model.gc_ode] table
                    assert str(cfg.model.gc_ode[key.removeprefix("model.gc_ode.")]) == value
                else:
                    section, field = key.split(".")
                    assert str(getattr(getattr(cfg, section), field)) == value


def test_gcgd_is_gc_w_plus_gc_ode_gradient_mode():
    assert methods.get("gcgd").select == ("corrections.chain=gc_w", "model.gc_ode.mode=gradient")


@pytest.mark.parametrize("method", ALL, ids=_ids(ALL))
def test_factories_and_options_resolve(method):
    if method.factory is not None:
        factory = method.load()
        accepted = inspect.signature(factory).parameters
        for kw in (*method.fixed, *method.options):
            assert kw in accepted, f"{method.name}: {kw!r} is not a parameter of its factory"
        section = "gradient" if method.kind == "estimator" else "loss"
        for field in method.options.values():
            assert hasattr(getattr(load_config(None), section), field), (
                f"{method.name}: no {section}.{field}"
            )
        if method.seeded:
            assert "key" in accepted
    if method.state_metric is not None:
        assert method.kind == "transform"
    else:
        with pytest.raises(ValueError, match="has no state metric"):
            method.read_state_metric(())


# --------------------------------------------------------------------- conformance by kind

TRANSFORMS = methods.methods_of_kind("transform")


@pytest.mark.parametrize("method", TRANSFORMS, ids=_ids(TRANSFORMS))
def test_every_transform_is_in_the_conformance_suite(method):
    """``tests/transforms/test_conformance.py`` has a case with this factory and fixed options."""
    factory = method.load()
    covered = [
        c
        for c in CASES
        if c.inject_factory is factory
        and all(c.inject_kwargs.get(k) == v for k, v in method.fixed.items())
    ]
    assert covered, (
        f"add a ConformanceCase for {method.name} to tests/transforms/test_conformance.py"
    )


LOSS_KINDS = methods.methods_of_kind("loss")


@pytest.mark.parametrize("method", LOSS_KINDS, ids=_ids(LOSS_KINDS))
def test_losses_conform(method):
    """Per-example, jit-safe, dtype-preserving and finite, with a finite gradient."""
    loss = method.load()
    kwargs = method.options_from(load_config(None).loss)
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    labels = jnp.arange(6) % 5
    for dtype in (jnp.float32, jnp.bfloat16):
        out = jax.jit(lambda lg: loss(lg, labels, **kwargs))(logits.astype(dtype))
        assert out.shape == (6,) and out.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    g = jax.grad(lambda lg: jnp.mean(loss(lg, labels, **kwargs)))(logits)
    assert g.shape == logits.shape and bool(jnp.all(jnp.isfinite(g)))


GRADIENT_KINDS = methods.methods_of_kind("gradient")


@pytest.mark.parametrize("method", GRADIENT_KINDS, ids=_ids(GRADIENT_KINDS))
def test_gradient_functions_conform(method):
    """A ``value_and_grad`` replacement: same call and return structure, jit-safe, finite."""
    make = method.load()
    kwargs = method.options_from(load_config(None).loss)

    def loss_fn(params, x):
        y = jnp.tanh(x @ params["w"]) + params["b"]
        return jnp.mean(y**2), {"y": y}

    params = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.zeros(2)}
    x = jnp.arange(12.0).reshape(4, 3) / 10
    ours = jax.jit(make(loss_fn, **kwargs, argnums=0, has_aux=True))
    (value, aux), grads = ours(params, x)
    (ref_value, ref_aux), ref_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert jnp.allclose(value, ref_value) and jnp.allclose(aux["y"], ref_aux["y"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert not jnp.allclose(optax.tree.norm(grads), 0.0)


ESTIMATOR_KINDS = methods.methods_of_kind("estimator")


@pytest.mark.parametrize("method", ESTIMATOR_KINDS, ids=_ids(ESTIMATOR_KINDS))
def test_estimators_conform(method):
    """A gradient-shaped estimate (the parameters' structure and dtypes), jit-safe, finite,
    the same for the same key and not for another, through its calling convention."""
    from flax import nnx

    from gcgd_jax.models import MLP

    model = MLP(12, (8,), 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = jnp.linspace(-1, 1, 48).reshape(4, 12), jnp.array([0, 1, 2, 1])
    kwargs = {**method.fixed, **method.options_from(load_config(None).gradient)}
    if method.perturbs == "weights":
        loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(graphdef, p)(x), y
        ).mean()
        run = jax.jit(lambda p, k: method.load()(loss, **kwargs)(p, x, y, key=k))
    else:
        run = jax.jit(lambda p, k: method.load()(**kwargs)(nnx.merge(graphdef, p), x, y, key=k))
    value, grads = run(params, jax.random.PRNGKey(0))
    _, again = run(params, jax.random.PRNGKey(0))
    _, other = run(params, jax.random.PRNGKey(1))
    assert jax.tree.structure(grads) == jax.tree.structure(params) and value.shape == ()
    for g, a, o, p in zip(*(jax.tree.leaves(t) for t in (grads, again, other, params))):
        assert g.shape == p.shape and g.dtype == p.dtype and bool(jnp.all(jnp.isfinite(g)))
        assert bool(jnp.array_equal(g, a))
    assert not all(
        bool(jnp.array_equal(g, o)) for g, o in zip(*map(jax.tree.leaves, (grads, other)))
    )


CONTINUAL = methods.methods_of_kind("continual")


@pytest.mark.parametrize("method", CONTINUAL, ids=_ids(CONTINUAL))
def test_every_continual_method_is_in_its_conformance_suite(method):
    """``tests/continual/test_conformance.py`` (the conformance checks with the memory
    gradients as extra arguments) covers this factory."""
    assert method.load() in CONTINUAL_FACTORIES.values(), (
        f"add {method.name}'s factory to tests/continual/test_conformance.py"
    )


# --------------------------------------------------------------------- from the command line


@pytest.mark.parametrize("method", ALL, ids=_ids(ALL))
def test_every_entry_runs_from_the_command_line(method, tmp_path, capsys):
    """``gcgd-train --set <its overrides>`` trains a tiny model; its state metric is logged.
    A continual-learning method: ``gcgd-continual --set <its overrides>`` runs a tiny task
    sequence to its summary."""
    out = tmp_path / method.name
    if method.kind == "continual":
        data = write_tiny_mnist(tmp_path / "data")
        assert continual_main(tiny_args(data, out, *method.select)) == 0, capsys.readouterr().err
        summary = read_metrics(out / "metrics.jsonl")[-1]
        assert summary["kind"] == "summary" and summary["method"] == method.value
        return
    args = [*TINY, "--set", "checkpoint.enabled=false", "--no-progress", "--out", str(out)]
    for override in (*ESTIMATOR_MODEL.get(method.kind, ()), *method.select):
        args += ["--set", override]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    epoch, summary = read_metrics(out / "metrics.jsonl")
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 0
    assert epoch["train_loss"] > 0.0
    parts = [methods.get(p) for p in method.parts] if method.parts else [method]
    for part in parts:
        if part.state_metric is not None:
            assert epoch[part.state_metric[0]] is not None
        if any(o.startswith("model.gc_ode.mode=") for o in part.select):
            assert epoch["gc_ode_loss"] is not None
            gated = any(
                o in part.select
                for o in ("model.gc_ode.mode=gradient", "model.gc_ode.mode=frozen_branch")
            )
            if gated:  # the measured gradient ratio (gcgd_jax.models.gc_ode.gradient_ratios)
                assert 0.0 < epoch["gc_ode_grad_ratio"] < 10.0
            else:
                assert "gc_ode_grad_ratio" not in epoch


# --------------------------------------------------------------------- documentation


def test_every_method_is_in_the_docs_methods_table():
    page = (ROOT / "docs" / "methods.md").read_text()
    table = "\n".join(line for line in page.splitlines() if line.startswith("|"))
    missing = [m.name for m in ALL if f"`{m.name}`" not in table]
    assert not missing, f"the Methods table (docs/methods.md) does not name {missing}"


def test_an_unknown_value_names_the_registry_choices():
    with pytest.raises(ConfigError, match="loss.name: unknown value 'focal'.*known: ce, powergrad"):
        load_config(None, ["loss.name=focal"])
