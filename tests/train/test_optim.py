"""The optimizer chain a configuration builds: every correction, masks, order, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.models import pre_downsampling_mask, resnet20
from gcgd_jax.train.config import CORRECTIONS, ConfigError, load_config
from gcgd_jax.train.optim import build_optimizer, build_schedule, current_lr, kernel_mask


@pytest.fixture(scope="module")
def model_params():
    model = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return model, params


def _grads(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def _build(model_params, overrides, total_steps=100):
    model, params = model_params
    cfg = load_config(None, overrides)
    return build_optimizer(
        cfg, params=params, model=model, total_steps=total_steps, steps_per_epoch=10
    )


@pytest.mark.parametrize("name", CORRECTIONS)
def test_each_correction_builds_and_updates(model_params, name):
    _, params = model_params
    extra = ["corrections.gc_w.warmup=0"] if name == "gc_w" else []
    bundle = _build(model_params, [f"corrections.chain={name}", "optim.weight_decay=1e-4", *extra])
    state = bundle.tx.init(params)
    grads = _grads(params)
    updates, state = jax.jit(bundle.tx.update)(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(current_lr(state)) == pytest.approx(0.1)


def test_gc_w_defaults_to_the_pre_downsampling_kernels(model_params):
    from gcgd_jax.transforms.gc_w import gc_w_states

    model, params = model_params
    mask = pre_downsampling_mask(model)
    selected = sum(bool(m) for m in jax.tree.leaves(mask))
    assert selected == 3  # ResNet-20: one kernel before each of its down-sampling points
    state = _build(model_params, ["corrections.chain=gc_w"]).tx.init(params)
    (gcw,) = gc_w_states(state)
    assert len(jax.tree.leaves(gcw.ema)) == selected

    state = _build(
        model_params, ["corrections.chain=gc_w", "corrections.gc_w.mask=all_kernels"]
    ).tx.init(params)
    (gcw,) = gc_w_states(state)
    assert len(jax.tree.leaves(gcw.ema)) == sum(
        bool(m) for m in jax.tree.leaves(kernel_mask(params))
    )


def test_unknown_correction_option_is_a_config_error(model_params):
    with pytest.raises(
        ConfigError, match="corrections.znorm: unknown option 'epsilon'; known: eps"
    ):
        _build(model_params, ["corrections.chain=znorm", "corrections.znorm.epsilon=1e-3"])
    with pytest.raises(ConfigError, match="corrections.gc_w: .*rho"):
        _build(model_params, ["corrections.chain=gc_w", "corrections.gc_w.rho=-1"])


def test_corrections_see_the_raw_gradient_by_default():
    """Default: centralize(g) + wd * w; after_weight_decay: centralize(g + wd * w) (GC's order)."""
    params = {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.ones(2)}
    grads = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    model = None
    common = [
        "corrections.chain=centralize",
        "optim.weight_decay=0.5",
        "optim.momentum=0",
        "optim.lr=1",
        "optim.schedule=constant",
    ]
    before = build_optimizer(
        load_config(None, common), params=params, model=model, total_steps=1, steps_per_epoch=1
    ).tx
    after = build_optimizer(
        load_config(None, [*common, "corrections.after_weight_decay=true"]),
        params=params,
        model=model,
        total_steps=1,
        steps_per_epoch=1,
    ).tx
    up_before, _ = before.update(grads, before.init(params), params)
    up_after, _ = after.update(grads, after.init(params), params)
    w = params["kernel"]
    np.testing.assert_allclose(-up_before["kernel"], 0.0 + 0.5 * w)  # centred ones are 0
    np.testing.assert_allclose(-up_after["kernel"], 0.5 * (w - w.mean(0, keepdims=True)))
    np.testing.assert_allclose(-up_before["bias"], 1.5 * jnp.ones(2))  # 1-D leaves not centred


def test_step_schedule_scales_with_the_budget():
    cfg = load_config(None, ["optim.lr=0.1", "optim.milestones=[0.5, 0.75]"])
    full = build_schedule(cfg.optim, total_steps=64000, warmup_steps=0)
    assert [float(full(s)) for s in (0, 31999, 32000, 47999, 48000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001]
    )
    half = build_schedule(cfg.optim, total_steps=32000, warmup_steps=0)
    assert [float(half(s)) for s in (15999, 16000, 24000)] == pytest.approx([0.1, 0.01, 0.001])


def test_warmup_cosine_and_constant():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.final_lr_fraction=0.1"])
    sched = build_schedule(cfg.optim, total_steps=110, warmup_steps=10)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.05)
    assert float(sched(10)) == pytest.approx(0.1) and float(sched(110)) == pytest.approx(0.01)
    const = build_schedule(load_config(None, ["optim.schedule=constant"]).optim, 100, 0)
    assert float(const(99)) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_base_optimizers(name):
    params = {"w": jnp.ones((2, 2))}
    cfg = load_config(
        None,
        [
            f"optim.name={name}",
            "optim.weight_decay=0.1",
            "optim.nesterov=true",
            "optim.weight_decay_on=kernels",
        ],
    )
    tx = build_optimizer(cfg, params=params, model=None, total_steps=10, steps_per_epoch=10).tx
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    assert bool(jnp.all(updates["w"] < 0)) and float(current_lr(state)) == pytest.approx(0.1)
