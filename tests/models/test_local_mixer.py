"""LocalMixer (Ren et al.): the paper's parameter counts, shapes, the three kinds of
locality of its losses, its taps and local pass, and its credits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.estimators import _common
from gcgd_jax.models import LOCAL_MIXER_CONFIGS, LocalMixer
from gcgd_jax.models.local_mixer import _replicated_cross_entropy


def _count(name, image_shape, num_classes):
    model = nnx.eval_shape(
        lambda: LocalMixer.from_config(
            name, image_shape=image_shape, num_classes=num_classes, rngs=nnx.Rngs(0)
        )
    )
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "name, image_shape, num_classes, count, paper",
    [
        ("S/1/1", (28, 28, 1), 10, 271_892, 272e3),
        ("M/1/16", (28, 28, 1), 10, 429_076, 429e3),
        ("M/8/16", (32, 32, 3), 10, 918_770, 919e3),
        ("L/32/64", (224, 224, 3), 100, 17_335_796, 17.3e6),
    ],
)
def test_parameter_counts_are_the_papers(name, image_shape, num_classes, count, paper):
    """Table 2 of Ren et al.: 272K, 429K, 919K, 17.3M (ImageNet with 100 classes)."""
    assert _count(name, image_shape, num_classes) == count
    assert round(count, -3 if count < 1e6 else -5) == paper
    assert set(LOCAL_MIXER_CONFIGS) == {"S/1/1", "M/1/16", "M/8/16", "L/32/64"}


def _small(local=True, **kwargs):
    return LocalMixer(
        (8, 8, 1),
        3,
        features=8,
        num_blocks=2,
        patches_per_side=2,
        num_groups=2,
        local=local,
        rngs=nnx.Rngs(0),
        **kwargs,
    )


IMAGES = jax.random.normal(jax.random.key(7), (4, 8, 8, 1))
LABELS = jnp.array([0, 1, 2, 1])


def test_shapes_and_losses():
    model = _small()
    assert model(IMAGES).shape == (4, 3)
    out = model.losses(IMAGES, LABELS)
    assert out.logits.shape == (4, 3) and out.final_loss.shape == (4,)
    assert len(out.block_losses) == 2 and out.block_losses[0].shape == (4,)
    assert out.replicated[1].shape == (4, 4, 2)  # batch, patches, groups
    for block, rep in zip(out.block_losses, out.replicated):  # same value everywhere
        np.testing.assert_allclose(rep, np.broadcast_to(block[:, None, None], rep.shape), rtol=1e-6)
    expected = np.mean(out.final_loss) + sum(np.mean(b) for b in out.block_losses)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    np.testing.assert_allclose(
        _small(local=False).losses(IMAGES, LABELS).loss, np.mean(out.final_loss)
    )
    # the read-out starts at zero: uniform logits
    np.testing.assert_allclose(out.final_loss, np.log(3.0), rtol=1e-6)


def test_patches_are_cut_row_by_row():
    model = _small()
    image = jnp.arange(64.0).reshape(1, 8, 8, 1)
    tokens = model._patchify(image)
    assert tokens.shape == (1, 4, 16)
    np.testing.assert_array_equal(tokens[0, 1], image[0, :4, 4:, 0].ravel())  # top right
    np.testing.assert_array_equal(tokens[0, 2], image[0, 4:, :4, 0].ravel())  # bottom left


def test_blockwise_stop_gradient():
    """With local losses each block is trained by its own head's loss only, and the
    read-out by its own loss only; with the global loss the read-out's loss reaches
    every block and the block heads are unused."""
    model = _small()
    model.readout.kernel[...] = jax.random.normal(jax.random.key(1), (8, 3))
    local_graphdef, params = nnx.split(model, nnx.Param)
    model.local = False
    global_graphdef, _ = nnx.split(model, nnx.Param)

    @jax.jit
    def grads(params):
        def on(graphdef, part):
            return jax.grad(lambda p: part(nnx.merge(graphdef, p).losses(IMAGES, LABELS)))(params)

        return (
            on(local_graphdef, lambda o: o.loss),
            on(local_graphdef, lambda o: jnp.mean(o.block_losses[0])),
            on(local_graphdef, lambda o: jnp.mean(o.final_loss)),
            on(global_graphdef, lambda o: o.loss),
        )

    local, block0, readout_only, global_ = grads(params)
    for a, b in zip(jax.tree.leaves(local["blocks"][0]), jax.tree.leaves(block0["blocks"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert all(np.all(g == 0) for g in jax.tree.leaves(readout_only["blocks"]))
    assert all(np.all(g == 0) for g in jax.tree.leaves(global_["heads"]))
    assert np.any(np.asarray(global_["blocks"][0]["channel"]["kernel"]) != 0)


def test_the_replicated_aggregator_splits_the_block_loss_by_patch_and_group():
    """Entry (b, p, g)'s derivative sees only patch p's and group g's features; summed
    over patches and groups it is the block loss's derivative."""
    feat = jax.random.normal(jax.random.key(1), (4, 4, 2, 4))
    kernel = jax.random.normal(jax.random.key(2), (8, 3))
    bias = jnp.zeros(3)
    onehot = jax.nn.one_hot(LABELS, 3)

    def plain(f, k, b):
        logits = jnp.mean(f, axis=1).reshape(4, -1) @ k + b
        return -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)

    d_feat = jax.random.normal(jax.random.key(3), feat.shape)
    d_head = (jax.random.normal(jax.random.key(4), kernel.shape), jnp.ones(3))

    def rep(f, k, b):
        return _replicated_cross_entropy(f, k, b, onehot)

    value, d_plain = jax.jvp(plain, (feat, kernel, bias), (d_feat, 0 * kernel, bias))
    out, d_rep = jax.jvp(rep, (feat, kernel, bias), (d_feat, 0 * kernel, bias))
    np.testing.assert_allclose(out[:, 2, 1], value, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(d_rep, axis=(1, 2)), d_plain, rtol=1e-4, atol=1e-6)
    # the head's own tangent reaches every entry whole (each is the block's loss)
    _, d_plain = jax.jvp(plain, (feat, kernel, bias), (0 * feat, *d_head))
    _, d_rep = jax.jvp(rep, (feat, kernel, bias), (0 * feat, *d_head))
    np.testing.assert_allclose(
        d_rep, np.broadcast_to(d_plain[:, None, None], d_rep.shape), rtol=1e-5
    )
    only = jnp.zeros_like(feat).at[:, 1, 0].set(d_feat[:, 1, 0])  # patch 1, group 0
    _, d_only = jax.jvp(
        lambda f: _replicated_cross_entropy(f, kernel, bias, onehot), (feat,), (only,)
    )
    mask = np.zeros((4, 4, 2), bool)
    mask[:, 1, 0] = True
    assert np.all(np.asarray(d_only)[~mask] == 0) and np.all(np.asarray(d_only)[mask] != 0)
    # reverse mode (local backpropagation) agrees with the plain loss
    g_rep = jax.grad(lambda f: jnp.sum(_replicated_cross_entropy(f, kernel, bias, onehot)))(feat)
    g_plain = jax.grad(lambda f: jnp.sum(plain(f, kernel, bias)))(feat)
    np.testing.assert_allclose(g_rep, g_plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("local", [True, False])
def test_taps_credits_and_local_pass(local):
    """The credits' derivatives add up to the objective's (each loss term credited once
    per unit), the local pass recomputes every tap's pre-activation, and a perturbation
    moves exactly its tap."""
    model = _small(local)
    model.readout.kernel[...] = jax.random.normal(jax.random.key(1), (8, 3))
    out = model.perturbed_loss(IMAGES, LABELS)
    assert set(out.preactivations) == {
        "block0/channel",
        "block0/group",
        "block1/token",
        "block1/channel",
        "block1/group",
    }
    assert out.preactivations["block1/token"].shape == (4, 8, 4)  # batch, channels, tokens
    assert out.preactivations["block1/group"].shape == (4, 4, 2, 4)
    local_pass = model.local_pass(out.record, IMAGES, LABELS)
    for name, z in out.preactivations.items():
        np.testing.assert_allclose(local_pass.preactivations[name], z, rtol=1e-5, atol=1e-6)
        assert out.active[name].shape == z.shape and out.active[name].dtype == bool
    zeros = {n: jnp.zeros_like(z) for n, z in out.preactivations.items()}
    u = _common.normal_like(jax.random.key(3), zeros)
    _, d_loss = jax.jvp(
        lambda p: model.perturbed_loss(IMAGES, LABELS, perturbation=p).loss, (zeros,), (u,)
    )
    _, d_credits = jax.jvp(
        lambda p: dict(model.perturbed_loss(IMAGES, LABELS, perturbation=p).credits), (zeros,), (u,)
    )
    # each tap's credits hold every loss term its units reach, once: summed, their
    # derivatives are those of its block's loss (local) or of the read-out's (global),
    # and the blocks' add up to the objective's
    per_block = {0: jnp.sum(d_credits["block0/group"]), 1: jnp.sum(d_credits["block1/group"])}
    for name, d in d_credits.items():
        expected = per_block[int(name[5])] if local else d_loss
        np.testing.assert_allclose(jnp.sum(d), expected, rtol=1e-4, atol=1e-7)
    if local:
        np.testing.assert_allclose(per_block[0] + per_block[1], d_loss, rtol=1e-4)
    bumped = model.perturbed_loss(
        IMAGES, LABELS, perturbation={"block1/channel": jnp.ones((4, 4, 2, 4))}
    )
    np.testing.assert_allclose(
        bumped.preactivations["block1/channel"], out.preactivations["block1/channel"] + 1, rtol=1e-6
    )
    np.testing.assert_allclose(
        bumped.preactivations["block0/group"], out.preactivations["block0/group"]
    )


def test_weight_credits_and_head_mask_have_the_params_structure():
    model = _small()
    params = nnx.state(model, nnx.Param)
    out = model.losses(IMAGES, LABELS)
    for channel_credit in ("group", "block"):
        credits = model.weight_credits(out, channel_credit=channel_credit)
        assert jax.tree.structure(credits) == jax.tree.structure(params)
        for c, p in zip(jax.tree.leaves(credits), jax.tree.leaves(params)):
            assert jnp.broadcast_shapes(c.shape, p.shape) == p.shape
    mask = LocalMixer.head_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert sum(jax.tree.leaves(mask)) == 6  # 2 heads + read-out, kernel and bias each
    with pytest.raises(ValueError, match="channel_credit"):
        model.weight_credits(out, channel_credit="unit")


def test_patchwise_false_sums_the_patches_terms():
    out_p = _small().perturbed_loss(IMAGES, LABELS)
    out_s = _small(patchwise=False).perturbed_loss(IMAGES, LABELS)
    c_p, c_s = out_p.credits["block0/group"], out_s.credits["block0/group"]
    np.testing.assert_allclose(
        c_s, np.broadcast_to(np.sum(c_p, axis=1, keepdims=True), c_s.shape), rtol=1e-6
    )


def test_bad_configurations():
    with pytest.raises(ValueError, match="patches_per_side"):
        LocalMixer(
            (28, 28, 1),
            10,
            features=8,
            num_blocks=1,
            patches_per_side=3,
            num_groups=1,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="num_groups"):
        LocalMixer(
            (8, 8, 1),
            10,
            features=8,
            num_blocks=1,
            patches_per_side=2,
            num_groups=3,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="num_blocks"):
        LocalMixer(
            (8, 8, 1),
            10,
            features=8,
            num_blocks=0,
            patches_per_side=2,
            num_groups=2,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="unknown LocalMixer"):
        LocalMixer.from_config("XL/1/1", image_shape=(8, 8, 1), num_classes=3, rngs=nnx.Rngs(0))
