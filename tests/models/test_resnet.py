"""ResNet family: parameter counts, shapes, train/eval, init, call contract, factory errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.models import (
    ResNet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet50,
    resnet56,
)
from gcgd_jax.ops import fusion_break


def _count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@functools.cache
def _abstract_cached(factory, items):
    return nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0), **dict(items)))


def _abstract(factory, **kwargs):
    """Builds the model abstractly (shapes only): parameter counting needs no compute."""
    return _abstract_cached(factory, tuple(sorted(kwargs.items())))


@pytest.fixture(scope="module")
def r20():
    return resnet20(rngs=nnx.Rngs(0))


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# Published figures: He et al. 2016 (ResNet-20, option-A shortcuts: 0.27M) and
# torchvision (ResNet-18/34/50 at 1000 classes).
@pytest.mark.parametrize(
    "factory, kwargs, published",
    [
        (resnet20, {}, 0.27e6),
        (resnet32, {}, 0.46e6),
        (resnet56, {}, 0.85e6),
        (resnet18, {"num_classes": 1000}, 11.69e6),
        (resnet34, {"num_classes": 1000}, 21.80e6),
        (resnet50, {"num_classes": 1000}, 25.56e6),
    ],
)
def test_parameter_counts_within_one_percent(factory, kwargs, published):
    count = _count(_abstract(factory, **kwargs))
    assert abs(count - published) / published < 0.01, count


def test_exact_counts_of_reference_models():
    assert _count(_abstract(resnet20)) == 269_722  # option A: no shortcut parameters
    assert _count(_abstract(resnet18, num_classes=1000)) == 11_689_512  # torchvision figure


def test_shortcut_option_b_adds_projections():
    plain = _count(_abstract(resnet20))
    b = _count(
        nnx.eval_shape(
            lambda: ResNet(
                (3, 3, 3),
                widths=(16, 32, 64),
                stem_features=16,
                num_classes=10,
                shortcut="B",
                rngs=nnx.Rngs(0),
            )
        )
    )
    assert b - plain == 16 * 32 + 32 * 64 + 2 * (32 + 64)  # two 1x1 convs + their BN


@pytest.mark.parametrize(
    "factory, kwargs, shape, classes",
    [
        (resnet20, {}, (2, 16, 16, 3), 10),
        (resnet20, {"in_channels": 1}, (2, 28, 28, 1), 10),
        (resnet18, {"num_classes": 10, "small_stem": True}, (2, 32, 32, 3), 10),
        (resnet18, {"num_classes": 7, "in_channels": 1}, (2, 28, 28, 1), 7),
    ],
)
def test_output_shapes(factory, kwargs, shape, classes):
    if factory is resnet18:  # shapes only (abstract evaluation): building 11.7M weights is slow
        logits = nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0), **kwargs)(_x(shape)))
    else:
        model = factory(rngs=nnx.Rngs(0), **kwargs)
        model.eval()
        logits = model(_x(shape))
        assert bool(jnp.all(jnp.isfinite(logits)))
    assert logits.shape == (shape[0], classes) and logits.dtype == jnp.float32


def test_stage_outputs_are_explicit(r20):
    r20.eval()
    hs = r20.stage_outputs(_x((2, 16, 16, 3)))
    assert [h.shape for h in hs] == [(2, 16, 16, 16), (2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64)]


def test_small_stem_keeps_resolution():
    model = nnx.eval_shape(lambda: resnet18(num_classes=10, small_stem=True, rngs=nnx.Rngs(0)))
    assert model.stem.kind == "small" and model.stem.conv.kernel.shape == (3, 3, 3, 64)


def test_train_mode_updates_batch_stats_eval_does_not(r20):
    x = _x((4, 8, 8, 3))
    r20.train()
    before = jax.tree.map(jnp.copy, nnx.state(r20, nnx.BatchStat))
    r20(x)
    after_train = nnx.state(r20, nnx.BatchStat)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after_train)
    assert all(jax.tree.leaves(changed))
    r20.eval()
    snapshot = jax.tree.map(jnp.copy, nnx.state(r20, nnx.BatchStat))
    y1 = r20(x)
    unchanged = jax.tree.map(
        lambda a, b: bool(jnp.all(a == b)), snapshot, nnx.state(r20, nnx.BatchStat)
    )
    assert all(jax.tree.leaves(unchanged))
    # Eval mode: an example's output does not depend on the rest of the batch.
    np.testing.assert_allclose(r20(x[:1]), y1[:1], rtol=1e-5, atol=1e-5)
    r20.train()


def test_batchnorm_settings_and_residual_init(r20):
    bns = [
        m
        for _, m in nnx.iter_modules(_abstract(resnet50, num_classes=1000))
        if isinstance(m, nnx.BatchNorm)
    ]
    assert bns and all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    # Default (He et al.): every BatchNorm scale starts at one.
    for stage in r20.stages:
        for block in stage.blocks:
            assert bool(jnp.all(block.bn2.scale[...] == 1)) and bool(
                jnp.all(block.bn1.scale[...] == 1)
            )
    for zero in (False, True):
        tiny = ResNet(
            (1, 1),
            block="bottleneck",
            widths=(4, 8),
            stem_features=8,
            num_classes=2,
            zero_init_residual=zero,
            rngs=nnx.Rngs(0),
        )
        for stage in tiny.stages:
            for block in stage.blocks:
                assert bool(jnp.all(block.bn3.scale[...] == (0 if zero else 1)))
                assert bool(jnp.all(block.bn2.scale[...] == 1))
    with pytest.raises(ValueError, match="zero_init_residual must be a bool"):
        resnet20(zero_init_residual="yes", rngs=nnx.Rngs(0))


def _shortcut_only(model, x):
    """The network with every residual branch removed: stem, shortcuts, ReLUs, head."""
    h = model.stem(x)
    for stage in model.stages:
        for block in stage.blocks:
            h = jax.nn.relu(block._residual(h))
    return model.head(jnp.mean(h, axis=(1, 2)))


def _perturb_conv2(model, stage: int, block: int):
    conv = model.stages[stage].blocks[block].conv2
    conv.kernel[...] = conv.kernel[...] * 1.5 + 0.01


@pytest.mark.parametrize("zero", [False, True])
def test_zero_init_residual_decides_whether_blocks_matter_at_init(zero):
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    model = resnet20(zero_init_residual=zero, rngs=nnx.Rngs(0))
    y = model(x)
    if zero:  # a fresh network is its shortcut-only version, whatever the branches hold
        np.testing.assert_allclose(y, _shortcut_only(model, x), rtol=1e-5, atol=1e-6)
    else:
        assert float(jnp.max(jnp.abs(y - _shortcut_only(model, x)))) > 1e-3
    for stage in range(3):
        for block in range(3):
            changed = resnet20(zero_init_residual=zero, rngs=nnx.Rngs(0))
            _perturb_conv2(changed, stage, block)
            diff = float(jnp.max(jnp.abs(changed(x) - y)))
            if zero:
                assert diff == 0.0, (stage, block)
            else:  # off: the output depends on every block
                assert diff > 1e-4, (stage, block)


def test_he_init_scale(r20):
    k = r20.stages[1].blocks[1].conv1.kernel[...]  # (3, 3, 32, 32): fan_in 288
    std = float(jnp.std(k))
    assert 0.8 * np.sqrt(2 / 288) < std < 1.2 * np.sqrt(2 / 288)


def test_return_aux_contract(r20):
    r20.eval()
    logits, aux = r20(_x((2, 8, 8, 3)), return_aux=True)
    assert logits.shape == (2, 10)
    assert set(aux) == {"gc_ode_loss"}
    assert aux["gc_ode_loss"].shape == () and aux["gc_ode_loss"].dtype == jnp.float32
    assert float(aux["gc_ode_loss"]) == 0.0
    r20.train()


def test_fusion_breaker_is_exact_noop_under_jit(r20):
    r20.train()
    graphdef, state = nnx.split(r20)
    state = nnx.as_pure(state)

    @jax.jit
    def fwd(state, x, breaker):
        return nnx.merge(graphdef, state)(x, fusion_breaker=breaker)

    x = _x((2, 8, 8, 3))
    with_breaker = fwd(state, x, jnp.float32(1.0))
    without = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_array_equal(np.asarray(with_breaker), np.asarray(without))
    assert fusion_break(x, None) is x


def test_fusion_breaker_reaches_every_block(r20, monkeypatch):
    import gcgd_jax.models.resnet as resnet_module

    calls = []
    monkeypatch.setattr(resnet_module, "fusion_break", lambda x, b: calls.append(b) or x)
    r20.eval()
    r20(_x((1, 8, 8, 3)), fusion_breaker=jnp.float32(1.0))
    r20.train()
    assert len(calls) == 9  # 3 stages x 3 blocks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_clases": 10}, "num_classes"),  # typo, with a suggestion
        ({"depth": 20}, "unknown"),
        ({"gc_ode": "gradeint"}, "gc_ode"),
        ({"gc_ode": 1}, "gc_ode"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_factory_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: resnet20(rngs=nnx.Rngs(0), **kwargs))


def test_factory_rejects_missing_rngs_and_cifar_only_args():
    with pytest.raises(ValueError, match="rngs"):
        resnet20()
    with pytest.raises(ValueError, match="small_stem"):
        resnet20(small_stem=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="small_stem"):
        nnx.eval_shape(lambda: resnet18(small_stem="yes", rngs=nnx.Rngs(0)))


def test_wrong_input_channels_is_a_clear_error(r20):
    with pytest.raises(ValueError, match="3 channels"):
        r20(_x((1, 8, 8, 1)))
