"""pre_downsampling_mask: exactly the intended kernels, by path, usable with optax.masked."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from gcgd_jax.models import (
    GCODEConfig,
    ResNet,
    pre_downsampling_mask,
    pre_downsampling_paths,
    resnet18,
    resnet20,
    resnet50,
)


def _abstract(factory, **kwargs):
    return nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0), **kwargs))


def _selected(mask) -> set:
    return {tuple(k) for k, v in nnx.to_flat_state(mask) if v}


def _kernel(stage, block, name):
    return ("stages", stage, "blocks", block, name, "kernel")


def test_resnet20_selects_three_kernels():
    model = _abstract(resnet20, gc_ode="gradient")
    assert _selected(pre_downsampling_mask(model)) == {
        _kernel(0, 2, "conv2"),
        _kernel(1, 2, "conv2"),
        _kernel(2, 2, "conv2"),
    }
    assert _selected(pre_downsampling_mask(model, whole_block=True)) == {
        _kernel(s, 2, name) for s in range(3) for name in ("conv1", "conv2")
    }


def test_resnet18_selects_four_kernels():
    model = _abstract(resnet18, gc_ode="branch")
    assert _selected(pre_downsampling_mask(model)) == {_kernel(s, 1, "conv2") for s in range(4)}
    assert _selected(pre_downsampling_mask(model, whole_block=True)) == {
        _kernel(s, 1, name) for s in range(4) for name in ("conv1", "conv2")
    }


def test_resnet50_selects_last_bottleneck_conv():
    model = _abstract(resnet50, gc_ode=GCODEConfig(width=16))
    last = {0: 2, 1: 3, 2: 5, 3: 2}
    assert _selected(pre_downsampling_mask(model)) == {
        _kernel(s, b, "conv3") for s, b in last.items()
    }
    assert _selected(pre_downsampling_mask(model, whole_block=True)) == {
        _kernel(s, b, name) for s, b in last.items() for name in ("conv1", "conv2", "conv3")
    }


def test_projection_shortcut_of_a_last_block_is_included():
    # One block per stage with option-B shortcuts: stages 2 and 3 end in a projection block.
    model = nnx.eval_shape(
        lambda: ResNet(
            (1, 1, 1),
            widths=(8, 16, 32),
            stem_features=8,
            num_classes=2,
            shortcut="B",
            rngs=nnx.Rngs(0),
        )
    )
    assert _selected(pre_downsampling_mask(model)) == {
        _kernel(0, 0, "conv2"),
        _kernel(1, 0, "conv2"),
        _kernel(1, 0, "shortcut_conv"),
        _kernel(2, 0, "conv2"),
        _kernel(2, 0, "shortcut_conv"),
    }


@pytest.mark.parametrize("whole_block", [False, True])
def test_mask_structure_matches_params_and_skips_gc_ode(whole_block):
    model = _abstract(resnet20, gc_ode="branch")
    mask = pre_downsampling_mask(model, whole_block=whole_block)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(params))
    assert all(isinstance(v, bool) for v in jax.tree.leaves(mask))
    assert not any(path[0] == "gc_ode" for path in _selected(mask))
    assert any(path[0] == "gc_ode" for path, _ in nnx.to_flat_state(params))
    assert sorted(_selected(mask)) == sorted(pre_downsampling_paths(model, whole_block=whole_block))


def test_mask_rejects_other_models():
    with pytest.raises(TypeError, match="ResNet"):
        pre_downsampling_mask(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_mask_drives_optax_masked_with_nnx_optimizer():
    model = ResNet((1, 2), widths=(4, 8), stem_features=4, num_classes=3, rngs=nnx.Rngs(0))
    for path, bn in nnx.iter_modules(model):  # undo the zero-init so every kernel gets a gradient
        if isinstance(bn, nnx.BatchNorm):
            bn.scale[...] = jnp.ones_like(bn.scale[...])
    mask = pre_downsampling_mask(model)
    keep_only_selected = jax.tree.map(lambda m: not m, mask)
    tx = optax.chain(optax.sgd(0.1), optax.masked(optax.set_to_zero(), keep_only_selected))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = nnx.to_flat_state(nnx.clone(nnx.state(model, nnx.Param)))
    x, y = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jnp.array([1, 2])

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss_fn)(model))

    step(model, optimizer)
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    changed = {tuple(k) for k, v in before if bool(jnp.any(v[...] != after[k][...]))}
    assert changed == _selected(mask)
