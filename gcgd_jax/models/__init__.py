"""Models: Flax NNX ResNets with optional GC-ODE hidden-state corrections.

Factories: :func:`resnet20`, :func:`resnet32`, :func:`resnet56` (CIFAR) and
:func:`resnet18`, :func:`resnet34`, :func:`resnet50` (ImageNet; ``small_stem``
for 32x32 inputs). :func:`pre_downsampling_mask` selects the kernels before
down-sampling (for ``optax.masked``). The CPU-speed workarounds the models use
(fusion breaker, GC-ODE's conv3x3 VJP and GroupNorm) live in
:mod:`gcgd_jax.cpu_speed`.
"""

from gcgd_jax.models.gc_ode import (
    GCODE,
    GCODEConfig,
    GCODEMode,
    ODEBranch,
    ODEVectorField,
    resolve_gc_ode,
)
from gcgd_jax.models.masks import pre_downsampling_mask, pre_downsampling_paths
from gcgd_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    Stage,
    Stem,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet50,
    resnet56,
)

__all__ = [
    "GCODE",
    "BasicBlock",
    "Bottleneck",
    "GCODEConfig",
    "GCODEMode",
    "ODEBranch",
    "ODEVectorField",
    "ResNet",
    "Stage",
    "Stem",
    "pre_downsampling_mask",
    "pre_downsampling_paths",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet50",
    "resnet56",
    "resolve_gc_ode",
]
