"""The optimizer chain a configuration builds: every correction, masks, order, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


STATEFUL = ("gc_w", "gc_w_v2")  # predictors that move the gradient only after some steps


def _reference_correction(name, model):
    """Each configuration name's correction built by hand from its transforms module."""
    from gcgd_jax.transforms.agr import agr
    from gcgd_jax.transforms.centralize import centralize
    from gcgd_jax.transforms.channel_directed import channel_directed
    from gcgd_jax.transforms.gc_w import gc_w
    from gcgd_jax.transforms.gc_w_v2 import gc_w_v2
    from gcgd_jax.transforms.grokfast_ema import grokfast_ema
    from gcgd_jax.transforms.mars_correction import mars_correction
    from gcgd_jax.transforms.znorm import znorm

    references = {
        "gc_w": lambda: optax.masked(gc_w(warmup=0, window=2, key=0), pre_downsampling_mask(model)),
        "gc_w_v2": lambda: optax.masked(gc_w_v2(key=0), pre_downsampling_mask(model)),
        "mars_correction": mars_correction,
        "grokfast_ema": grokfast_ema,
        "centralize": centralize,
        "channel_directed_h0": lambda: channel_directed(metric="h0"),
        "channel_directed_sobolev": lambda: channel_directed(metric="sobolev"),
        "znorm": znorm,
        "agr": agr,
    }
    assert name in references, f"add a hand-built reference for the new correction {name!r}"
    return references[name]()


@pytest.mark.parametrize("name", CORRECTIONS)
def test_each_correction_name_builds_its_own_transform(model_params, name):
    """With sgd (no momentum, lr 1, no decay) the chain's update is -T(g) for the named T,
    step after step (GC-W: 4 steps, so its predictor has trained and moves the gradient),
    and T(g) is not the raw gradient: a name wired to another transform or to
    ``optax.identity`` fails. A new correction name needs its reference here."""
    model, params = model_params
    extra = ["corrections.gc_w.warmup=0", "corrections.gc_w.window=2"] if name == "gc_w" else []
    common = ["optim.momentum=0", "optim.lr=1", "optim.schedule=constant", *extra]
    tx = _build(model_params, [f"corrections.chain={name}", *common]).tx
    ref = _reference_correction(name, model)
    state, ref_state = tx.init(params), ref.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for step in range(4 if name in STATEFUL else 1):
        grads = _grads(params, seed=step + 1)
        updates, state = update(grads, state, params)
        expected, ref_state = ref_update(grads, ref_state, params)
        for u, e in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            np.testing.assert_allclose(-np.asarray(u), np.asarray(e), rtol=1e-5, atol=1e-6)
    changed = [
        float(jnp.linalg.norm(e - g) / jnp.linalg.norm(g))
        for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(grads))
    ]
    assert max(changed) > 1e-3, f"{name} left the gradient unchanged"
    assert float(current_lr(state)) == pytest.approx(1.0)


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
        ConfigError, match="corrections.znorm: unknown option 'epsilon'.*known: eps, mask"
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


def _reference_base(name, mask):
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(0.1, mask=mask),
            optax.sgd(0.1, momentum=0.9, nesterov=True),
        )
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(0.1, mask=mask), optax.adam(0.1))
    return optax.adamw(0.1, weight_decay=0.1, mask=mask)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_base_optimizers(name):
    """Three updates equal optax's own optimizer with Nesterov momentum (sgd) and weight decay
    on the kernels only; the bias is large so that decaying it would change its update."""
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.array([5.0, -5.0])}
    cfg = load_config(
        None,
        [
            f"optim.name={name}",
            "optim.weight_decay=0.1",
            "optim.nesterov=true",
            "optim.weight_decay_on=kernels",
            "optim.schedule=constant",
        ],
    )
    tx = build_optimizer(cfg, params=params, model=None, total_steps=10, steps_per_epoch=10).tx
    ref = _reference_base(name, {"w": True, "b": False})
    plain = _reference_base(name, {"w": True, "b": True})  # decay on every leaf
    state, ref_state, plain_state = tx.init(params), ref.init(params), plain.init(params)
    for step in range(3):
        key = jax.random.key(step)
        grads = jax.tree.map(lambda p, k=key: 0.3 * jax.random.normal(k, p.shape), params)
        updates, state = tx.update(grads, state, params)
        expected, ref_state = ref.update(grads, ref_state, params)
        decayed_everywhere, plain_state = plain.update(grads, plain_state, params)
        for key in params:
            np.testing.assert_allclose(updates[key], expected[key], rtol=1e-4, atol=1e-6)
        params = optax.apply_updates(params, updates)
    assert not np.allclose(expected["b"], decayed_everywhere["b"])  # the check can fail
    assert float(current_lr(state)) == pytest.approx(0.1)
    if name == "sgd":  # Nesterov changes the update (1.9 g on the first step, not g)
        classic = optax.chain(
            optax.add_decayed_weights(0.1, mask={"w": True, "b": False}),
            optax.sgd(0.1, momentum=0.9),
        )
        p0 = {"w": jnp.full((2, 2), 2.0), "b": jnp.array([5.0, -5.0])}
        g0 = jax.tree.map(lambda p: 0.3 * jax.random.normal(jax.random.key(0), p.shape), p0)
        u_classic, _ = classic.update(g0, classic.init(p0), p0)
        u_cfg, _ = tx.update(g0, tx.init(p0), p0)
        assert not np.allclose(u_classic["b"], u_cfg["b"])
