"""Models: Flax NNX ResNets with optional GC-ODE hidden-state corrections.

Factories: :func:`resnet20`, :func:`resnet32`, :func:`resnet56` (CIFAR) and
:func:`resnet18`, :func:`resnet34`, :func:`resnet50` (ImageNet; ``small_stem``
for 32x32 inputs). :func:`pre_downsampling_mask` selects the kernels before
down-sampling (for ``optax.masked``). The CPU-speed workarounds the models use
(fusion breaker, GC-ODE's conv3x3 VJP and GroupNorm) live in
:mod:`gcgd_jax.ops`. :class:`AuxSpec` is how a model's auxiliary outputs
(GC-ODE's loss, gate and gradient ratio) reach the train step (:mod:`gcgd_jax.models.aux`).
For the forward-gradient estimators (:mod:`gcgd_jax.estimators`): :class:`LocalMixer`
(Ren et al.'s local-loss MLP-Mixer; :meth:`LocalMixer.from_config` builds the
paper's configurations) and :class:`MLP` (a ReLU MLP), both exposing their pre-activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcgd_jax._lazy import lazy_exports

_RESNET = ("BasicBlock", "Bottleneck", "ResNet", "Stage", "Stem")
_FACTORIES = ("resnet18", "resnet20", "resnet32", "resnet34", "resnet50", "resnet56")
_GC_ODE = ("GCODE", "GCODEConfig", "GCODEMode", "ODEBranch", "ODEVectorField", "resolve_gc_ode")
_LOCAL_MIXER = (
    "LOCAL_MIXER_CONFIGS",
    "GroupLinear",
    "LocalMixer",
    "LocalMixerConfig",
    "LocalMixerOutput",
    "MixerBlock",
)
# public name -> the module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    "AuxSpec": "gcgd_jax.models.aux",
    **dict.fromkeys(_GC_ODE, "gcgd_jax.models.gc_ode"),
    **dict.fromkeys(_LOCAL_MIXER, "gcgd_jax.models.local_mixer"),
    "MLP": "gcgd_jax.models.mlp",
    **dict.fromkeys(("pre_downsampling_mask", "pre_downsampling_paths"), "gcgd_jax.models.masks"),
    **dict.fromkeys((*_RESNET, *_FACTORIES), "gcgd_jax.models.resnet"),
}
__all__ = sorted(_EXPORTS, key=lambda n: (not n.isupper(), n))
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # static analysers see the eager imports
    from gcgd_jax.models.aux import AuxSpec
    from gcgd_jax.models.gc_ode import (
        GCODE,
        GCODEConfig,
        GCODEMode,
        ODEBranch,
        ODEVectorField,
        resolve_gc_ode,
    )
    from gcgd_jax.models.local_mixer import (
        LOCAL_MIXER_CONFIGS,
        GroupLinear,
        LocalMixer,
        LocalMixerConfig,
        LocalMixerOutput,
        MixerBlock,
    )
    from gcgd_jax.models.masks import pre_downsampling_mask, pre_downsampling_paths
    from gcgd_jax.models.mlp import MLP
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
