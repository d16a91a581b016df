"""LocalMixer (Ren et al., ICLR 2023): an MLP-Mixer trained with local losses.

Architecture (the paper's Sec. 5 and the official code, ``mixer_lib.py`` and
``train_mixer_supervised.py`` of google-research's ``local_forward_gradient``):
the image is cut into ``n x n`` patches (tokens, ``P = n^2``); block 0 is a
channel-mixing MLP (patch pixels -> ``D`` -> grouped ``D``); every later block
is one token-mixing linear layer, then a channel-mixing MLP (``D -> D`` dense,
then ``D -> D`` as ``G`` groups of ``D/G``), with a residual connection. Every
linear layer has a parameter-free LayerNorm before and after it (over the
channels, or within each group for the grouped layer and the layers around
it), then a ReLU.

Local losses. After every block, a linear head shared by all patches and
groups classifies the block's features averaged over patches (LayerNorm within
each group first). Three kinds of locality:

* blockwise: a stop-gradient between blocks, so a block's loss trains only that
  block and its head;
* patchwise and groupwise: through the "replicated aggregator" every patch
  ``p`` and group ``g`` of a block has its own loss term ``L[b, p, g]``, equal in
  value to the block's cross-entropy but differentiating only through its own
  patch's and group's features (the others behind a stop-gradient). Their sum
  has the block loss's gradient; the split tells a forward-gradient estimator
  which directional derivative to credit each unit with (the credits of
  :meth:`LocalMixer.perturbed_loss`).

A read-out head (zero-initialised) classifies the last block's features
averaged over patches (LayerNorm first); with local losses it sits behind a
stop-gradient, so it trains only itself. ``local=False`` gives the global
objective instead: the read-out's cross-entropy, differentiated through every
block (the block heads are then unused).

Configurations of the paper's Table 2 (:data:`LOCAL_MIXER_CONFIGS`, through
:meth:`LocalMixer.from_config`): ``"S/1/1"`` (MNIST, 272K parameters),
``"M/1/16"`` (MNIST, 429K), ``"M/8/16"`` (CIFAR-10, 919K), ``"L/32/64"``
(ImageNet, 17.3M with 100 classes): size / patches per side / groups. The counts come out of the
official code's layer sizes and are checked by the tests.

Choices to know about: the initial kernels follow the official code's
``kaiming`` scheme (:math:`\\mathcal N(0, s^2)`, :math:`s = \\min(2/\\sqrt{\\text{fan-in}},
0.1)`, its ImageNet setting; its flag default is a constant 0.1), biases and the
read-out kernel start at zero; LayerNorm has epsilon 1e-5 and computes the
variance as a mean of squared deviations. Input normalisation (per-channel
mean and standard deviation) is the data pipeline's job. With
``patchwise=False`` a unit is credited with the sum of its group's loss terms
over patches (unbiased); the official code's ``spatial_loss=False`` averages them,
which scales the estimate by ``1/P``. For local-loss weight perturbation,
:meth:`LocalMixer.weight_credits` follows the official code by default, whose
per-group credit of the dense channel layer is biased (the LayerNorm after that
layer spans all groups); ``channel_credit="block"`` is the unbiased alternative.
Activity perturbation is unaffected (it perturbs after that LayerNorm). The
official training script's optimizer-side choices (the read-out's gradient
scaled by 0.1, its ``last_layer_lr`` default, and weight decay 1e-4 on kernels
only) belong to the optimizer, not to the model
(``optim.gradient_scale_params``, ``optim.weight_decay_on = "kernels"`` in
``gcgd-train``). With the same parameters and noise, the forward pass, backprop,
LG-BP and the four estimators equal the official code's to float32 rounding
(``tests/parity/test_estimator_parity.py``, ``docs/parity.md``), once three of its
quirks are accounted for: its token-mixing and dense channel layers add their bias
twice (ours holds the effective bias), its global-loss FG-A does not divide the
per-example losses by the batch size, and its global-loss runs still train the block
heads. Not provided: the official code's optional
convolutional token mixing, down-sampling and channel growth between blocks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gcgd_jax.estimators.protocol import LocalPass, PerturbedLoss
from gcgd_jax.models.local_mixer_config import LOCAL_MIXER_CONFIGS, LocalMixerConfig

__all__ = [
    "LOCAL_MIXER_CONFIGS",
    "GroupLinear",
    "LocalMixer",
    "LocalMixerConfig",
    "LocalMixerOutput",
    "MixerBlock",
]

LN_EPSILON = 1e-5


def _layer_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Parameter-free LayerNorm over ``axis`` (computed in float32 at least).

    Divides by ``sqrt`` rather than multiplying by ``lax.rsqrt``: with jaxlib 0.10.2
    on the CPU, the VJP of ``rsqrt`` vmapped over more than about 256 items (e.g.
    many estimates at once) is miscompiled and returns wrong values; jaxlib 0.12.1
    and the ``sqrt`` form are correct.
    """
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(y, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=axis, keepdims=True)
    return ((y - mean) / jnp.sqrt(var + LN_EPSILON)).astype(x.dtype)


def _kernel_init(fan_in: int) -> Callable[..., jax.Array]:
    return nnx.initializers.normal(stddev=min(2.0 / math.sqrt(fan_in), 0.1))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@jax.custom_jvp
def _replicated_cross_entropy(
    features: jax.Array, kernel: jax.Array, bias: jax.Array, onehot: jax.Array
) -> jax.Array:
    """``[B, P, G]``: each example's cross-entropy of ``head(mean_p features)``,
    replicated per patch and group; the tangent of entry ``(b, p, g)`` sees only
    ``features[b, p, g]`` (plus the head's own tangent)."""
    batch, patches, groups, _ = features.shape
    logits = jnp.mean(features, axis=1).reshape(batch, -1) @ kernel + bias
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.broadcast_to(ce[:, None, None], (batch, patches, groups))


@_replicated_cross_entropy.defjvp
def _replicated_cross_entropy_jvp(primals: tuple, tangents: tuple) -> tuple:
    features, kernel, bias, onehot = primals
    d_features, d_kernel, d_bias, _ = tangents
    batch, patches, groups, width = features.shape
    pooled = jnp.mean(features, axis=1).reshape(batch, -1)
    logits = pooled @ kernel + bias
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    delta = jax.nn.softmax(logits) - onehot  # d ce / d logits, [B, K]
    back = jnp.einsum("gck,bk->bgc", kernel.reshape(groups, width, -1), delta)  # [B, G, C]
    d_own = jnp.einsum("bpgc,bgc->bpg", d_features, back) / patches
    d_head = jnp.sum((pooled @ d_kernel + d_bias) * delta, axis=-1)
    shape = (batch, patches, groups)
    return jnp.broadcast_to(ce[:, None, None], shape), d_own + d_head[:, None, None]


class GroupLinear(nnx.Module):
    """``G`` independent dense layers on ``[..., G, in]`` -> ``[..., G, out]``.

    Kernel ``(G, in, out)`` (Flax layout per group), bias ``(G, out)``.
    """

    def __init__(
        self,
        num_groups: int,
        in_features: int,
        out_features: int,
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (num_groups, in_features, out_features)
        self.kernel = nnx.Param(_kernel_init(in_features)(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_groups, out_features), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...gi,gio->...go", x, self.kernel[...]) + self.bias[...]


class MixerBlock(nnx.Module):
    """One LocalMixer block: token mixing (all but the first block), then a
    channel-mixing MLP (dense, then grouped), with a residual connection (all but
    the first block). Taps ``<prefix>/token`` (``[B, D, P]``), ``<prefix>/channel``
    and ``<prefix>/group`` (``[B, P, G, D/G]``), each after its LayerNorm."""

    def __init__(
        self,
        in_features: int,
        features: int,
        num_tokens: int,
        num_groups: int,
        *,
        token_mixing: bool,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        def dense(a: int, b: int) -> nnx.Linear:
            return nnx.Linear(
                a,
                b,
                kernel_init=_kernel_init(a),
                dtype=param_dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        width = features // num_groups
        self.token = dense(num_tokens, num_tokens) if token_mixing else None
        self.channel = dense(in_features, features)
        self.group = GroupLinear(num_groups, width, width, param_dtype=param_dtype, rngs=rngs)
        self.num_groups = num_groups
        self.activation = activation

    def __call__(
        self,
        h: jax.Array,
        tap: Callable[[str, jax.Array, jax.Array | None], jax.Array],
        record: dict[str, jax.Array],
        prefix: str,
    ) -> jax.Array:
        """``h``: ``[B, P, in]`` -> ``[B, P, G, D/G]``. ``tap(name, z, residual)``
        adds the perturbation, records the tap and returns the perturbed ``z``."""
        batch, tokens, _ = h.shape
        if self.token is not None:
            residual = h.reshape(batch, tokens, self.num_groups, -1)
            record[f"{prefix}/token"] = t_in = jnp.swapaxes(_layer_norm(h), 1, 2)
            z = tap(f"{prefix}/token", _layer_norm(self.token(t_in), axis=1), None)
            h = jnp.swapaxes(self.activation(z), 1, 2)
        else:
            residual = None
        record[f"{prefix}/channel"] = c_in = _layer_norm(h)
        z = _layer_norm(self.channel(c_in)).reshape(batch, tokens, self.num_groups, -1)
        z = tap(f"{prefix}/channel", z, None)
        record[f"{prefix}/group"] = g_in = _layer_norm(self.activation(z))
        z = tap(f"{prefix}/group", _layer_norm(self.group(g_in)), residual)
        return self.activation(z if residual is None else z + residual)

    def local_preactivations(
        self, record: Mapping[str, jax.Array], prefix: str
    ) -> dict[str, jax.Array]:
        """The taps' pre-activations recomputed from their recorded inputs."""
        c_in = record[f"{prefix}/channel"]
        batch, tokens, _ = c_in.shape
        pre = {}
        if self.token is not None:
            pre[f"{prefix}/token"] = _layer_norm(self.token(record[f"{prefix}/token"]), axis=1)
        z = _layer_norm(self.channel(c_in))
        pre[f"{prefix}/channel"] = z.reshape(batch, tokens, self.num_groups, -1)
        pre[f"{prefix}/group"] = _layer_norm(self.group(record[f"{prefix}/group"]))
        return pre


class LocalMixerOutput(NamedTuple):
    """What :meth:`LocalMixer.losses` returns."""

    loss: jax.Array  # () float32: the objective (local: sum of block losses + read-out).
    logits: jax.Array  # [B, K]: the read-out's logits.
    block_losses: tuple[jax.Array, ...]  # per block, [B] float32: its head's cross-entropy.
    # per block, [B, P, G]: the replicated per-patch, per-group loss terms.
    replicated: tuple[jax.Array, ...]
    final_loss: jax.Array  # [B] float32: the read-out's cross-entropy.


class LocalMixer(nnx.Module):
    """The LocalMixer of Ren et al. (module docstring: architecture and losses).

    Implements :class:`~gcgd_jax.estimators.ActivityPerturbable`: taps
    ``block{k}/token``, ``block{k}/channel`` and ``block{k}/group``, perturbed
    after the LayerNorm that follows each linear layer (as the official code
    does); the layer-local pass is the linear layer and that LayerNorm; the heads
    are trained by exact local gradients. Not ``downstream`` (no "Wᵀ" or
    activation-mixing guesses).

    Args:
        image_shape: ``(H, W, C)`` of the inputs; ``H`` and ``W`` divisible by
            ``patches_per_side``.
        num_classes: the number of logits of every head.
        features: ``D``, channels and hidden width, divisible by ``num_groups``.
        num_blocks: blocks (each with a local head).
        patches_per_side: ``n``; ``P = n^2`` tokens.
        num_groups: ``G``, channel groups of the grouped layers and local losses.
        local: train with local losses (blockwise, patchwise, groupwise) rather
            than the global read-out loss. Static.
        patchwise: credit each patch with its own loss term (else the sum over
            patches of its group's terms). Static.
        activation: a ReLU (zero exactly where its input is not positive).
        param_dtype: the parameters' dtype (the computation runs in it).
        rngs: random streams for the initial kernels.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from gcgd_jax.models import LocalMixer
        >>> model = LocalMixer.from_config("M/8/16", image_shape=(32, 32, 3), num_classes=10,
        ...                                rngs=nnx.Rngs(0))
        >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        918770
        >>> out = model.losses(jnp.ones((2, 32, 32, 3)), jnp.array([1, 2]))
        >>> out.logits.shape, len(out.block_losses), out.replicated[0].shape
        ((2, 10), 4, (2, 64, 16))
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        *,
        features: int,
        num_blocks: int,
        patches_per_side: int,
        num_groups: int,
        local: bool = True,
        patchwise: bool = True,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        height, width, channels = image_shape
        n = patches_per_side
        if n < 1 or height % n or width % n:
            raise ValueError(
                f"patches_per_side={n} must divide the image's height and width {height}x{width}."
            )
        if num_groups < 1 or features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide features={features}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.image_shape = tuple(image_shape)
        self.patches_per_side = n
        self.num_groups = num_groups
        self.local = local
        self.patchwise = patchwise
        num_tokens = n * n
        patch_features = (height // n) * (width // n) * channels
        self.blocks = nnx.List(
            [
                MixerBlock(
                    patch_features if k == 0 else features,
                    features,
                    num_tokens,
                    num_groups,
                    token_mixing=k > 0,
                    activation=activation,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for k in range(num_blocks)
            ]
        )

        def head(init: Callable[..., jax.Array]) -> nnx.Linear:
            return nnx.Linear(
                features,
                num_classes,
                kernel_init=init,
                dtype=param_dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.heads = nnx.List([head(_kernel_init(features)) for _ in range(num_blocks)])
        self.readout = head(nnx.initializers.zeros_init())

    @classmethod
    def from_config(
        cls,
        config: str | LocalMixerConfig,
        *,
        image_shape: Sequence[int],
        num_classes: int,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> LocalMixer:
        """A LocalMixer of the paper's Table 2 by name (:data:`LOCAL_MIXER_CONFIGS`):
        ``"S/1/1"``, ``"M/1/16"`` (MNIST), ``"M/8/16"`` (CIFAR-10), ``"L/32/64"``
        (ImageNet), or of a :class:`LocalMixerConfig`. ``kwargs`` go to the
        constructor (``local``, ``patchwise``, ``param_dtype`` ...)."""
        if isinstance(config, str):
            if config not in LOCAL_MIXER_CONFIGS:
                known = sorted(LOCAL_MIXER_CONFIGS)
                raise ValueError(f"unknown LocalMixer {config!r}; known: {known}.")
            config = LOCAL_MIXER_CONFIGS[config]
        fields = dataclasses.asdict(config)
        return cls(image_shape, num_classes, **fields, **kwargs, rngs=rngs)

    @staticmethod
    def head_mask(params: Any) -> Any:
        """A tree of bools shaped like ``params`` (``nnx.state(model, nnx.Param)``):
        True on the heads' and the read-out's leaves. For
        ``weight_perturbation(..., exact=LocalMixer.head_mask)``, which then trains
        them with exact local gradients, as the official code does."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _key(path[0]) in ("heads", "readout"), params
        )

    def _patchify(self, x: jax.Array) -> jax.Array:
        n = self.patches_per_side
        batch, height, width, channels = x.shape
        x = x.reshape(batch, n, height // n, n, width // n, channels)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, n * n, -1)

    def _forward(
        self,
        x: jax.Array,
        labels: jax.Array | None,
        perturbation: Mapping[str, jax.Array] | None,
    ) -> tuple[LocalMixerOutput | jax.Array, dict, dict, dict]:
        pre: dict[str, jax.Array] = {}
        active: dict[str, jax.Array] = {}
        record: dict[str, jax.Array] = {}

        def tap(name: str, z: jax.Array, residual: jax.Array | None) -> jax.Array:
            if perturbation is not None and name in perturbation:
                z = z + perturbation[name]
            pre[name] = z
            active[name] = (z if residual is None else z + residual) > 0
            return z

        h = self._patchify(x)
        batch, tokens, _ = h.shape
        features = []
        for k, block in enumerate(self.blocks):
            out = block(h, tap, record, f"block{k}")
            features.append(_layer_norm(out))
            record[f"head{k}"] = features[-1]
            if self.local:
                out = jax.lax.stop_gradient(out)
            h = out.reshape(batch, tokens, -1)
        final = _layer_norm(jnp.mean(h, axis=1))
        record["readout"] = final
        logits = self.readout(final)
        if labels is None:
            return logits, pre, active, record

        final_loss = _cross_entropy(logits, labels)
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=final_loss.dtype)
        block_losses, replicated = [], []
        for feat, head in zip(features, self.heads):
            pooled = jnp.mean(feat, axis=1).reshape(batch, -1)
            block_losses.append(_cross_entropy(head(pooled), labels))
            kernel, bias = head.kernel[...], head.bias[...]
            replicated.append(_replicated_cross_entropy(feat, kernel, bias, onehot))
        loss = jnp.mean(final_loss)
        if self.local:
            loss = loss + sum(jnp.mean(b) for b in block_losses)
        output = LocalMixerOutput(loss, logits, tuple(block_losses), tuple(replicated), final_loss)
        return output, pre, active, record

    def __call__(
        self, x: jax.Array, perturbation: Mapping[str, jax.Array] | None = None
    ) -> jax.Array:
        """The read-out's logits for images ``x`` (``[B, H, W, C]``)."""
        return self._forward(x, None, perturbation)[0]

    def losses(
        self,
        x: jax.Array,
        labels: jax.Array,
        *,
        perturbation: Mapping[str, jax.Array] | None = None,
    ) -> LocalMixerOutput:
        """The objective and its parts for images ``x`` and integer ``labels``.

        ``jax.grad`` of ``.loss`` is local backpropagation (LG-BP) when
        ``local``, plain backpropagation of the read-out loss otherwise.
        """
        return self._forward(x, labels, perturbation)[0]

    def _credits(self, out: LocalMixerOutput, pre: Mapping[str, jax.Array]) -> dict:
        batch = out.final_loss.shape[0]
        credits = {}
        for name, z in pre.items():
            if not self.local:
                credits[name] = (out.final_loss / batch).reshape((batch,) + (1,) * (z.ndim - 1))
                continue
            terms = out.replicated[int(name.split("/")[0][len("block") :])] / batch  # [B, P, G]
            if not self.patchwise:
                terms = jnp.broadcast_to(jnp.sum(terms, axis=1, keepdims=True), terms.shape)
            if name.endswith("/token"):  # [B, D, P]: a token's unit reaches all its groups
                credits[name] = jnp.sum(terms, axis=2)[:, None, :]
            else:  # [B, P, G, D/G]
                credits[name] = terms[..., None]
        return credits

    def perturbed_loss(
        self,
        x: jax.Array,
        labels: jax.Array,
        *,
        perturbation: Mapping[str, jax.Array] | None = None,
    ) -> PerturbedLoss:
        """The objective, with per-example, per-patch, per-group credits when
        ``local`` (per-example credits of the read-out loss otherwise)."""
        out, pre, active, record = self._forward(x, labels, perturbation)
        return PerturbedLoss(out.loss, self._credits(out, pre), pre, active, record)

    def local_pass(
        self, record: Mapping[str, jax.Array], x: jax.Array, labels: jax.Array
    ) -> LocalPass:
        """Every tap's linear layer and LayerNorm on its recorded input; the loss
        of the heads on their recorded (stop-gradient) features."""
        pre: dict[str, jax.Array] = {}
        for k, block in enumerate(self.blocks):
            pre.update(block.local_preactivations(record, f"block{k}"))
        loss = jnp.mean(_cross_entropy(self.readout(record["readout"]), labels))
        if self.local:
            for k, head in enumerate(self.heads):
                feat = record[f"head{k}"]
                pooled = jnp.mean(feat, axis=1).reshape(feat.shape[0], -1)
                loss = loss + jnp.mean(_cross_entropy(head(pooled), labels))
        return LocalPass(pre, loss)

    def weight_credits(
        self, out: LocalMixerOutput, *, channel_credit: Literal["group", "block"] = "group"
    ) -> Any:
        """Per-parameter credits for local-loss weight perturbation (LG-FG-W), a
        tree shaped like ``nnx.state(self, nnx.Param)``; everything is credited with
        ``out.loss`` when not ``local``. With local losses: a block's token-mixing
        layer with all its block's loss terms; its grouped layer's group ``g`` with
        group ``g``'s terms (summed over the batch and patches); a head with its
        block's loss; the read-out with its loss. The dense channel layer's output
        unit ``h``:

        * ``channel_credit="group"`` (the official code): with its group's terms.
          **Biased**: the LayerNorm after that layer normalises over all channels,
          so a change of unit ``h`` reaches every group's loss, whose derivative
          along the direction is then left out. The tests measure this bias.
        * ``"block"``: with all its block's terms. Unbiased, more variance.

        Use inside the loss function given to
        :func:`~gcgd_jax.estimators.weight_perturbation`::

            def loss_fn(params, x, y):
                model = nnx.merge(graphdef, params)
                out = model.losses(x, y)
                return Credited(out.loss, model.weight_credits(out))
        """
        if channel_credit not in ("group", "block"):
            raise ValueError(f"channel_credit must be 'group' or 'block', got {channel_credit!r}.")
        params = nnx.state(self, nnx.Param)
        if not self.local:
            return jax.tree.map(lambda _: out.loss, params)
        batch = out.final_loss.shape[0]

        def credit(path: tuple, leaf: jax.Array) -> jax.Array:
            keys = [_key(k) for k in path]
            if keys[0] == "readout":
                return jnp.mean(out.final_loss)
            if keys[0] == "heads":
                return jnp.mean(out.block_losses[keys[1]])
            _, k, layer, kind = keys[:4]
            terms = out.replicated[k] / batch
            if layer == "token" or (layer == "channel" and channel_credit == "block"):
                return jnp.sum(terms)
            per_group = jnp.sum(terms, axis=(0, 1))  # [G]
            if layer == "channel":
                per_unit = jnp.repeat(per_group, leaf.shape[-1] // per_group.shape[0])
                return per_unit if kind == "bias" else per_unit[None, :]
            return per_group[:, None] if kind == "bias" else per_group[:, None, None]

        return jax.tree_util.tree_map_with_path(credit, params)


def _key(entry: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry
