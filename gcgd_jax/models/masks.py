"""Parameter masks for the models: where GC-W goes."""

from __future__ import annotations

from flax import nnx

from gcgd_jax.models.resnet import ResNet

__all__ = ["pre_downsampling_mask", "pre_downsampling_paths"]


def pre_downsampling_paths(model: ResNet, *, whole_block: bool = False) -> list[tuple]:
    """Paths (tuples of keys, as in ``nnx.state(model, nnx.Param)``) of the kernels
    :func:`pre_downsampling_mask` selects, in stage order."""
    if not isinstance(model, ResNet):
        raise TypeError(
            f"pre_downsampling_mask supports gcgd_jax.models.ResNet, got {type(model).__name__}."
        )
    paths = []
    for i, stage in enumerate(model.stages):
        j = len(stage.blocks) - 1
        block = stage.blocks[j]
        prefix = ("stages", i, "blocks", j)
        if whole_block:
            names = [
                name
                for name in ("conv1", "conv2", "conv3", "shortcut_conv")
                if getattr(block, name, None) is not None
            ]
        else:
            # The kernels whose outputs are summed into the stage output.
            names = [block.output_conv]
            if block.shortcut_conv is not None:
                names.append("shortcut_conv")
        paths.extend((*prefix, name, "kernel") for name in names)
    return paths


def pre_downsampling_mask(model: ResNet, *, whole_block: bool = False) -> nnx.State:
    """Boolean mask over ``nnx.state(model, nnx.Param)`` selecting, per stage, the
    kernel(s) directly before down-sampling.

    "Directly before down-sampling" = the layer that produces the stage output
    ``h_i`` (the input of the next stage's strided convolution; for the last
    stage, of global pooling): the last convolution of the stage's last residual
    block (``conv2`` of a basic block, ``conv3`` of a bottleneck), plus that
    block's projection-shortcut kernel if it has one. That is 3 kernels on the
    CIFAR ResNets and 4 on ResNet-18/34/50. Only kernels are selected (no
    BatchNorm scale/bias, no biases); GC-ODE parameters are never selected.

    Args:
      model: a :class:`gcgd_jax.models.ResNet`.
      whole_block: select every kernel of the last block of each stage
        (``conv1``, ``conv2``, ``conv3``, ``shortcut_conv`` where present).

    Returns:
      An ``nnx.State`` with the structure of ``nnx.state(model, nnx.Param)`` and
      ``bool`` leaves, for ``optax.masked(tx, mask)`` with
      ``nnx.Optimizer(model, ..., wrt=nnx.Param)``.

    Example:
      >>> import jax, optax
      >>> from flax import nnx
      >>> from gcgd_jax.models import resnet20, pre_downsampling_mask
      >>> model = resnet20(rngs=nnx.Rngs(0))
      >>> mask = pre_downsampling_mask(model)
      >>> sum(jax.tree.leaves(mask))
      3
      >>> tx = optax.chain(optax.masked(optax.scale(2.0), mask), optax.sgd(0.1))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    With GC-W: ``optax.chain(optax.masked(gcgd_jax.gc_w(), mask), optax.sgd(0.1))``.
    Note: with the zero-initialised last BatchNorm scale of each block, the
    selected kernels get exactly zero gradient until that scale moves off zero.
    """
    selected = set(pre_downsampling_paths(model, whole_block=whole_block))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return nnx.map_state(lambda path, _: tuple(path) in selected, params)
