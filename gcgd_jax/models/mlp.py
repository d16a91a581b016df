"""A ReLU MLP classifier whose pre-activations the forward-gradient estimators can perturb."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gcgd_jax.estimators.protocol import LocalPass, PerturbedLoss

__all__ = ["MLP"]


class MLP(nnx.Module):
    """Dense layers with ReLU between them, on flattened inputs.

    ``layers[i]`` is an ``nnx.Linear`` (Flax defaults: LeCun-normal kernel,
    zero bias); the pre-activation of layer ``i`` is the tap ``"layer{i}"``
    (the last one is the logits). Implements
    :class:`~gcgd_jax.estimators.ActivityPerturbable` with the mean softmax
    cross-entropy over the batch as the loss, each example credited with its
    own term (``loss_b / B``), and ``downstream`` (layer ``i + 1`` reads the
    ReLU of layer ``i``), so every estimator of :mod:`gcgd_jax.estimators`
    applies.

    Args:
        in_features: the flattened input size (e.g. 784 for MNIST).
        hidden_features: the hidden layers' widths (empty: a linear classifier).
        num_classes: the number of logits.
        activation: the hidden activation. It must be zero exactly where its
            input is not positive (a ReLU): the taps' ``active`` masks assume
            it. A forward-only ReLU (one without a VJP) works too, which is how
            the tests show that no estimator differentiates the network in
            reverse mode.
        param_dtype: the parameters' dtype (the computation runs in it).
        rngs: the random streams for the initial kernels.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from gcgd_jax.models import MLP
        >>> model = MLP(784, (256, 256), 10, rngs=nnx.Rngs(0))
        >>> model(jnp.ones((2, 28, 28, 1))).shape
        (2, 10)
        >>> out = model.perturbed_loss(jnp.ones((2, 784)), jnp.array([3, 7]))
        >>> sorted(out.credits), out.credits["layer0"].shape
        (['layer0', 'layer1', 'layer2'], (2, 1))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        num_classes: int,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden_features, num_classes]
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, dtype=param_dtype, param_dtype=param_dtype, rngs=rngs)
                for a, b in itertools.pairwise(sizes)
            ]
        )
        self.activation = activation

    def _forward(
        self, x: jax.Array, perturbation: Mapping[str, jax.Array] | None
    ) -> tuple[jax.Array, dict, dict, dict]:
        h = x.reshape(x.shape[0], -1)
        pre, active, record = {}, {}, {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            name = f"layer{i}"
            record[name] = h
            z = layer(h)
            if perturbation is not None and name in perturbation:
                z = z + perturbation[name]
            pre[name] = z
            if i < last:
                active[name] = z > 0
                h = self.activation(z)
            else:
                active[name] = jnp.ones(z.shape, bool)
        return z, pre, active, record

    def __call__(
        self, x: jax.Array, perturbation: Mapping[str, jax.Array] | None = None
    ) -> jax.Array:
        """The logits; ``perturbation[tap]`` is added to that tap's pre-activation."""
        return self._forward(x, perturbation)[0]

    def perturbed_loss(
        self,
        x: jax.Array,
        labels: jax.Array,
        *,
        perturbation: Mapping[str, jax.Array] | None = None,
    ) -> PerturbedLoss:
        """Mean softmax cross-entropy of integer ``labels``, per-example credits."""
        logits, pre, active, record = self._forward(x, perturbation)
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels
        )
        credit = (per_example / per_example.shape[0])[:, None]
        return PerturbedLoss(
            loss=jnp.mean(per_example),
            credits=dict.fromkeys(pre, credit),
            preactivations=pre,
            active=active,
            record=record,
        )

    def local_pass(self, record: Mapping[str, jax.Array], *args: Any, **kwargs: Any) -> LocalPass:
        """Each layer applied to its recorded input; no locally trained part."""
        pre = {f"layer{i}": layer(record[f"layer{i}"]) for i, layer in enumerate(self.layers)}
        return LocalPass(preactivations=pre, loss=jnp.zeros((), jnp.float32))

    def downstream(self) -> dict[str, str]:
        """Layer ``i + 1`` reads the ReLU of layer ``i``'s pre-activation."""
        return {f"layer{i}": f"layer{i + 1}" for i in range(len(self.layers) - 1)}
