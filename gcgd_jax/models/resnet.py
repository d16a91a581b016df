"""ResNets in Flax NNX (NHWC) with optional GC-ODE corrections.

CIFAR family (He et al. 2016, Sec. 4.2): 3x3 stem to 16 channels, three
stages of ``n`` basic blocks with 16/32/64 channels (``depth = 6n + 2``),
global average pooling, one dense layer. Shortcuts use **option A** by default
(identity; when the shape changes, stride-2 subsampling and zero-padding of the
new channels, split evenly before and after) -- parameter-free, as in the
paper's CIFAR experiments, giving ResNet-20 its published 0.27M parameters.
Option B (1x1 projection + BatchNorm where the shape changes) is available as
``ResNet(..., shortcut="B")``.

ImageNet family (He et al. 2016, Table 1; layout of Flax's
``examples/imagenet/models.py``): 7x7/2 stem to 64 channels + 3x3/2 max pool
(or, with ``small_stem=True``, a 3x3/1 stem and no pool, for 32x32 inputs),
four stages of 64/128/256/512 features, basic blocks (ResNet-18/34) or
bottleneck blocks with expansion 4 and the stride on the 3x3 conv (ResNet-50,
"v1.5"), projection shortcuts (1x1 conv + BatchNorm) where the shape changes.

Everywhere: convolutions without bias, He-normal (fan-in) kernels, BatchNorm
with momentum 0.9 and epsilon 1e-5. ``zero_init_residual`` (default off, as in
He et al. and torchvision) initialises the last BatchNorm scale of every
residual block to zero, so that a fresh block is its shortcut (Goyal et al.
2017, "Accurate, Large Minibatch SGD", arXiv 1706.02677, Sec. 5.1; Flax's
ImageNet example does this). With option-A shortcuts and zero scales, a fresh
CIFAR ResNet is the stem plus the classifier and plain SGD spends many steps
growing the scales back (measured on MNIST: 96 steps reach 28-38% test
accuracy with zero scales, 96% with scales at one), so it is off unless a
recipe asks for it. Models are built in training mode (BatchNorm uses batch
statistics); ``model.eval()`` / ``model.train()`` switch.

Stage outputs ``h_0`` (stem) ... ``h_S`` (stage ``S``) are explicit in
:meth:`ResNet.__call__`; a :class:`~gcgd_jax.models.gc_ode.GCODE` correction,
if configured, acts between each adjacent pair.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from gcgd_jax.layers.backward_grad_norm import backward_grad_norm as normalize_backward
from gcgd_jax.models.aux import AuxSpec
from gcgd_jax.models.gc_ode import GCODE, GCODEConfig, GCODEMode, probe_metrics, resolve_gc_ode
from gcgd_jax.models.gc_ode import aux_spec as gc_ode_aux_spec
from gcgd_jax.ops import conv as conv_ops
from gcgd_jax.ops.fusion import fusion_break

__all__ = [
    "BasicBlock",
    "BlockKind",
    "Bottleneck",
    "ResNet",
    "Shortcut",
    "Stage",
    "Stem",
    "StemKind",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
]

BlockKind = Literal["basic", "bottleneck"]
StemKind = Literal["cifar", "imagenet", "small"]
Shortcut = Literal["A", "B"]

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = " or ".join(", ".join(repr(c) for c in choices).rsplit(", ", 1))
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def _conv(
    in_features: int, out_features: int, kernel: int, stride: int, *, rngs: nnx.Rngs
) -> nnx.Conv:
    pad = (kernel - 1) // 2
    conv_fn = (
        conv_ops.chunked_wgrad_conv if conv_ops.CHUNKED_WGRAD else jax.lax.conv_general_dilated
    )
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=nnx.initializers.he_normal(),
        conv_general_dilated=conv_fn,
        rngs=rngs,
    )


def _bn(features: int, *, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.BatchNorm:
    kwargs = {"scale_init": nnx.initializers.zeros_init()} if zero_scale else {}
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs, **kwargs)


class BasicBlock(nnx.Module):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus shortcut, ReLU.

    ``shortcut``: ``"A"`` (identity / subsample + zero-pad, parameter-free) or
    ``"B"`` (1x1 projection + BN where the shape changes, identity otherwise).
    ``zero_init_residual``: the last BN scale starts at zero (the block starts
    as its shortcut).
    """

    expansion = 1
    output_conv = "conv2"

    def __init__(
        self,
        in_features: int,
        features: int,
        stride: int,
        *,
        shortcut: Shortcut = "B",
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
    ):
        _check_choice("shortcut", shortcut, get_args(Shortcut))
        self.in_features, self.out_features, self.stride = in_features, features, stride
        self.conv1 = _conv(in_features, features, 3, stride, rngs=rngs)
        self.bn1 = _bn(features, rngs=rngs)
        self.conv2 = _conv(features, features, 3, 1, rngs=rngs)
        self.bn2 = _bn(features, rngs=rngs, zero_scale=zero_init_residual)
        self.shortcut = shortcut
        if shortcut == "B" and (stride != 1 or in_features != features):
            self.shortcut_conv = _conv(in_features, features, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(features, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def _residual(self, x: jax.Array) -> jax.Array:
        if self.shortcut_conv is not None:
            return self.shortcut_bn(self.shortcut_conv(x))
        if self.stride == 1 and self.in_features == self.out_features:
            return x
        # Option A: subsample, zero-pad the new channels (split evenly).
        r = x[:, :: self.stride, :: self.stride, :]
        extra = self.out_features - self.in_features
        return jnp.pad(r, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

    def __call__(self, x: jax.Array, fusion_breaker: jax.Array | None = None) -> jax.Array:
        x = fusion_break(x, fusion_breaker)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + self._residual(x))


class Bottleneck(nnx.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (4x) -> BN, plus
    projection shortcut where the shape changes, ReLU. ``zero_init_residual``:
    the last BN scale starts at zero."""

    expansion = 4
    output_conv = "conv3"

    def __init__(
        self,
        in_features: int,
        features: int,
        stride: int,
        *,
        shortcut: Shortcut = "B",
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
    ):
        if shortcut != "B":
            raise ValueError("Bottleneck blocks support only projection shortcuts (shortcut='B').")
        out = features * self.expansion
        self.in_features, self.out_features, self.stride = in_features, out, stride
        self.conv1 = _conv(in_features, features, 1, 1, rngs=rngs)
        self.bn1 = _bn(features, rngs=rngs)
        self.conv2 = _conv(features, features, 3, stride, rngs=rngs)
        self.bn2 = _bn(features, rngs=rngs)
        self.conv3 = _conv(features, out, 1, 1, rngs=rngs)
        self.bn3 = _bn(out, rngs=rngs, zero_scale=zero_init_residual)
        self.shortcut = shortcut
        if stride != 1 or in_features != out:
            self.shortcut_conv = _conv(in_features, out, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(out, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array, fusion_breaker: jax.Array | None = None) -> jax.Array:
        x = fusion_break(x, fusion_breaker)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        r = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return jax.nn.relu(y + r)


class Stem(nnx.Module):
    """``"cifar"``/``"small"``: 3x3/1 conv -> BN -> ReLU. ``"imagenet"``: 7x7/2
    conv -> BN -> ReLU -> 3x3/2 max pool (padding 1)."""

    def __init__(self, kind: StemKind, in_channels: int, features: int, *, rngs: nnx.Rngs):
        _check_choice("stem", kind, get_args(StemKind))
        self.kind = kind
        kernel, stride = (7, 2) if kind == "imagenet" else (3, 1)
        self.conv = _conv(in_channels, features, kernel, stride, rngs=rngs)
        self.bn = _bn(features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.bn(self.conv(x)))
        if self.kind == "imagenet":
            h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return h


class Stage(nnx.Module):
    """A sequence of residual blocks; the first one may down-sample."""

    def __init__(
        self,
        block_cls: type[BasicBlock | Bottleneck],
        num_blocks: int,
        in_features: int,
        features: int,
        stride: int,
        *,
        shortcut: Shortcut,
        zero_init_residual: bool = False,
        backward_grad_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        self.backward_grad_norm = backward_grad_norm
        blocks = []
        for j in range(num_blocks):
            blocks.append(
                block_cls(
                    in_features,
                    features,
                    stride if j == 0 else 1,
                    shortcut=shortcut,
                    zero_init_residual=zero_init_residual,
                    rngs=rngs,
                )
            )
            in_features = features * block_cls.expansion
        self.blocks = nnx.List(blocks)
        self.out_features = in_features

    def __call__(self, x: jax.Array, fusion_breaker: jax.Array | None = None) -> jax.Array:
        for block in self.blocks:
            x = block(x, fusion_breaker)
            if self.backward_grad_norm:
                x = normalize_backward(x)
        return x


class ResNet(nnx.Module):
    """A ResNet with explicit stage outputs and an optional GC-ODE correction.

    Args:
      stage_sizes: blocks per stage.
      block: ``"basic"`` or ``"bottleneck"``.
      widths: features per stage (a bottleneck stage outputs ``4 x`` that).
      stem: ``"cifar"`` (3x3/1 to ``stem_features``), ``"imagenet"`` (7x7/2 +
        max pool) or ``"small"`` (3x3/1, no pool).
      stem_features: stem channels.
      num_classes: outputs of the final dense layer.
      in_channels: input image channels (1 for the MNIST family).
      shortcut: ``"A"`` or ``"B"`` (basic blocks; bottlenecks need ``"B"``).
      zero_init_residual: start the last BatchNorm scale of every residual
        block at zero (Goyal et al. 2017); default ``False`` (He et al. 2016).
      backward_grad_norm: normalise, per sample, the gradient flowing back into
        every residual block's output (:func:`gcgd_jax.layers.backward_grad_norm`;
        Cabana & Lago-Fernández 2021); the forward pass is unchanged. Default ``False``.
      gc_ode: ``None``, a mode (``"gradient"``, ``"branch"``, ``"scale_only"``,
        ``"frozen_branch"``) or a ``GCODEConfig``.
      rngs: ``nnx.Rngs``.

    Call: ``model(x, *, return_aux=False, fusion_breaker=None)`` with ``x`` NHWC
    float. Returns logits ``(N, num_classes)``, or ``(logits, aux)`` with
    ``aux = {"gc_ode_loss": float32 scalar}`` when ``return_aux`` (0.0 without
    GC-ODE, in branch mode and in eval mode), plus ``"gc_ode_gate"`` (the mean
    gate ``s_t`` over the pairs) with GC-ODE. In gradient mode, train with
    ``loss = task_loss + aux["gc_ode_loss"]``: the auxiliary loss trains only
    the GC-ODE branches, the task loss only the backbone. ``fusion_breaker``: a
    runtime scalar 1.0 for the CPU (:func:`gcgd_jax.ops.fusion_break`), or
    ``None``. ``aux_probe``: :meth:`new_aux_probe`'s array, differentiated with
    the loss; :meth:`aux_probe_metrics` of its gradient is GC-ODE's measured
    gradient ratio in the gated modes (the train step does this: the model
    side of the auxiliary seam, :mod:`gcgd_jax.models.aux`).
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        *,
        block: BlockKind = "basic",
        widths: Sequence[int],
        stem: StemKind = "cifar",
        stem_features: int,
        num_classes: int,
        in_channels: int = 3,
        shortcut: Shortcut = "B",
        zero_init_residual: bool = False,
        backward_grad_norm: bool = False,
        gc_ode: GCODEMode | GCODEConfig | None = None,
        rngs: nnx.Rngs,
    ):
        _check_choice("block", block, get_args(BlockKind))
        _check_choice("stem", stem, get_args(StemKind))
        _check_choice("shortcut", shortcut, get_args(Shortcut))
        if len(stage_sizes) != len(widths) or not stage_sizes:
            raise ValueError("stage_sizes and widths must be non-empty and of equal length.")
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if not isinstance(zero_init_residual, bool):
            raise ValueError(f"zero_init_residual must be a bool, got {zero_init_residual!r}.")
        if not isinstance(backward_grad_norm, bool):
            raise ValueError(f"backward_grad_norm must be a bool, got {backward_grad_norm!r}.")
        config = resolve_gc_ode(gc_ode)
        block_cls = BasicBlock if block == "basic" else Bottleneck

        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem = Stem(stem, in_channels, stem_features, rngs=rngs)
        stages, channels, strides = [], [stem_features], []
        in_features = stem_features
        for i, (size, width) in enumerate(zip(stage_sizes, widths)):
            stride = 1 if i == 0 else 2
            stage = Stage(
                block_cls,
                size,
                in_features,
                width,
                stride,
                shortcut=shortcut,
                zero_init_residual=zero_init_residual,
                backward_grad_norm=backward_grad_norm,
                rngs=rngs,
            )
            stages.append(stage)
            in_features = stage.out_features
            channels.append(in_features)
            strides.append(stride)
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(in_features, num_classes, rngs=rngs)
        # Built last, so the backbone's initial weights do not depend on gc_ode.
        self.gc_ode = None if config is None else GCODE(channels, strides, config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        return_aux: bool = False,
        fusion_breaker: jax.Array | None = None,
        aux_probe: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected NHWC input with {self.in_channels} channels, got shape {x.shape}."
            )
        h = self.stem(x)  # h_0
        if aux_probe is not None and self.gc_ode is None:
            raise ValueError("aux_probe was given, but this model has no GC-ODE.")
        if self.gc_ode is None:
            for stage in self.stages:
                h = stage(h, fusion_breaker)
            gc_ode_loss = jnp.zeros((), jnp.float32)
        else:  # GC-ODE between every (h_i, h_{i+1})
            gate = jnp.mean(self.gc_ode.gates())  # the gates this step uses (before updating)
            h, gc_ode_loss = self.gc_ode.run_stages(
                list(self.stages),
                h,
                compute_loss=return_aux,
                stage_kwargs={"fusion_breaker": fusion_breaker},
                probe=aux_probe,
            )
        logits = self.head(jnp.mean(h, axis=(1, 2)))
        if return_aux:
            aux = {"gc_ode_loss": gc_ode_loss}
            if self.gc_ode is not None:
                aux["gc_ode_gate"] = gate
            return logits, aux
        return logits

    def aux_spec(self, *, probe: bool = True) -> AuxSpec:
        """What the train step does with this model's ``aux`` (:mod:`gcgd_jax.models.aux`):
        nothing without GC-ODE, :func:`gcgd_jax.models.gc_ode.aux_spec` with it."""
        return (
            AuxSpec() if self.gc_ode is None else gc_ode_aux_spec(self.gc_ode.config, probe=probe)
        )

    def new_aux_probe(self) -> jax.Array | None:
        """The gradient probe to pass as ``aux_probe`` (GC-ODE's gated modes; else ``None``)."""
        return None if self.gc_ode is None else self.gc_ode.new_probe()

    def aux_probe_metrics(self, probe_grad: jax.Array) -> dict[str, jax.Array]:
        """Named scalars from the probe's gradient: ``gc_ode_grad_ratio``, the mean over
        pairs of ``||dL/dh_{i-1}|| / ||J_stage^T g||``."""
        return probe_metrics(probe_grad)

    def stage_outputs(
        self, x: jax.Array, *, fusion_breaker: jax.Array | None = None
    ) -> list[jax.Array]:
        """``[h_0, ..., h_S]`` as the network uses them (after any GC-ODE join)."""
        hs = [self.stem(x)]
        for i, stage in enumerate(self.stages):
            if self.gc_ode is None:
                hs.append(stage(hs[-1], fusion_breaker))
            else:
                h = stage(self.gc_ode.stage_input(i, hs[-1]), fusion_breaker)
                hs.append(self.gc_ode(i, hs[-1], h, compute_loss=False)[0])
        return hs


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _reject_unknown(factory: str, unknown: dict, allowed: Sequence[str]) -> None:
    if unknown:
        msgs = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            msgs.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{factory}() got unknown argument(s) {', '.join(msgs)}; allowed: {', '.join(allowed)}."
        )


_CIFAR_ARGS = (
    "num_classes",
    "in_channels",
    "zero_init_residual",
    "backward_grad_norm",
    "gc_ode",
    "rngs",
)
_IMAGENET_ARGS = (
    "num_classes",
    "in_channels",
    "small_stem",
    "zero_init_residual",
    "backward_grad_norm",
    "gc_ode",
    "rngs",
)


def _cifar(
    name: str,
    depth: int,
    num_classes,
    in_channels,
    zero_init_residual,
    backward_grad_norm,
    gc_ode,
    rngs,
    unknown,
) -> ResNet:
    _reject_unknown(name, unknown, _CIFAR_ARGS)
    if rngs is None:
        raise ValueError(f"{name}() needs rngs=nnx.Rngs(...).")
    n = (depth - 2) // 6
    return ResNet(
        (n, n, n),
        block="basic",
        widths=(16, 32, 64),
        stem="cifar",
        stem_features=16,
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut="A",
        zero_init_residual=zero_init_residual,
        backward_grad_norm=backward_grad_norm,
        gc_ode=gc_ode,
        rngs=rngs,
    )


def _imagenet(
    name: str,
    stage_sizes,
    block,
    num_classes,
    in_channels,
    small_stem,
    zero_init_residual,
    backward_grad_norm,
    gc_ode,
    rngs,
    unknown,
) -> ResNet:
    _reject_unknown(name, unknown, _IMAGENET_ARGS)
    if rngs is None:
        raise ValueError(f"{name}() needs rngs=nnx.Rngs(...).")
    if not isinstance(small_stem, bool):
        raise ValueError(f"small_stem must be a bool, got {small_stem!r}.")
    return ResNet(
        stage_sizes,
        block=block,
        widths=(64, 128, 256, 512),
        stem="small" if small_stem else "imagenet",
        stem_features=64,
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut="B",
        zero_init_residual=zero_init_residual,
        backward_grad_norm=backward_grad_norm,
        gc_ode=gc_ode,
        rngs=rngs,
    )


def resnet20(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """CIFAR ResNet-20 (3 x 3 basic blocks, option-A shortcuts, 0.27M parameters).

    Args:
      num_classes: number of classes (default 10).
      in_channels: input channels (3; 1 for MNIST-family images).
      zero_init_residual: start every block's last BatchNorm scale at zero
        (Goyal et al. 2017). Default ``False``, as in He et al.'s ResNet-20.
      backward_grad_norm: normalise each block's backward gradient per sample
        (see :class:`ResNet`).
      gc_ode: ``None``, a mode (``"gradient"``, ``"branch"``, ``"scale_only"``,
        ``"frozen_branch"``) or a ``GCODEConfig``.
      rngs: ``nnx.Rngs`` (required).

    Any other keyword argument raises ``ValueError``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from gcgd_jax.models import resnet20
      >>> model = resnet20(gc_ode="gradient", rngs=nnx.Rngs(0))
      >>> logits, aux = model(jnp.zeros((2, 32, 32, 3)), return_aux=True)
      >>> logits.shape, sorted(aux)
      ((2, 10), ['gc_ode_gate', 'gc_ode_loss'])
    """
    return _cifar(
        "resnet20",
        20,
        num_classes,
        in_channels,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )


def resnet32(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """CIFAR ResNet-32 (3 x 5 basic blocks, option-A shortcuts). See :func:`resnet20`."""
    return _cifar(
        "resnet32",
        32,
        num_classes,
        in_channels,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )


def resnet56(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """CIFAR ResNet-56 (3 x 9 basic blocks, option-A shortcuts). See :func:`resnet20`."""
    return _cifar(
        "resnet56",
        56,
        num_classes,
        in_channels,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )


def resnet18(
    num_classes: int = 1000,
    *,
    in_channels: int = 3,
    small_stem: bool = False,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """ImageNet ResNet-18 (basic blocks [2, 2, 2, 2], 11.69M parameters at 1000 classes).

    Args:
      num_classes: number of classes (default 1000).
      in_channels: input channels.
      small_stem: a 3x3/1 stem without max pool (for 32x32 inputs such as CIFAR).
      zero_init_residual: start every block's last BatchNorm scale at zero, as
        in Goyal et al. 2017 and Flax's ImageNet example. Default ``False``, as
        in He et al. 2016 and torchvision.
      backward_grad_norm: normalise each block's backward gradient per sample
        (see :class:`ResNet`).
      gc_ode: ``None``, a mode (``"gradient"``, ``"branch"``, ``"scale_only"``,
        ``"frozen_branch"``) or a ``GCODEConfig``.
      rngs: ``nnx.Rngs`` (required).

    Any other keyword argument raises ``ValueError``.
    """
    return _imagenet(
        "resnet18",
        (2, 2, 2, 2),
        "basic",
        num_classes,
        in_channels,
        small_stem,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )


def resnet34(
    num_classes: int = 1000,
    *,
    in_channels: int = 3,
    small_stem: bool = False,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """ImageNet ResNet-34 (basic blocks [3, 4, 6, 3]). See :func:`resnet18`."""
    return _imagenet(
        "resnet34",
        (3, 4, 6, 3),
        "basic",
        num_classes,
        in_channels,
        small_stem,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )


def resnet50(
    num_classes: int = 1000,
    *,
    in_channels: int = 3,
    small_stem: bool = False,
    zero_init_residual: bool = False,
    backward_grad_norm: bool = False,
    gc_ode: GCODEMode | GCODEConfig | None = None,
    rngs: nnx.Rngs | None = None,
    **unknown: Any,
) -> ResNet:
    """ImageNet ResNet-50 (bottleneck blocks [3, 4, 6, 3], stage outputs 256/512/1024/2048
    channels). With GC-ODE, pass a ``GCODEConfig`` with a small ``width`` (e.g. 64)
    to keep the branches cheap. See :func:`resnet18`."""
    return _imagenet(
        "resnet50",
        (3, 4, 6, 3),
        "bottleneck",
        num_classes,
        in_channels,
        small_stem,
        zero_init_residual,
        backward_grad_norm,
        gc_ode,
        rngs,
        unknown,
    )
