"""The ReLU MLP of the forward-gradient estimators: shapes, taps and local pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gcgd_jax.models import MLP


def test_shapes_taps_and_local_pass():
    model = MLP(12, (10, 7), 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 3, 4))  # flattened to 12
    labels = jnp.array([0, 1, 2, 3, 0])
    logits = model(x)
    assert logits.shape == (5, 4)
    out = model.perturbed_loss(x, labels)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(out.loss, expected.mean(), rtol=1e-6)
    assert list(out.preactivations) == ["layer0", "layer1", "layer2"]
    for name in out.credits:
        np.testing.assert_allclose(out.credits[name][:, 0], expected / 5, rtol=1e-6)
    assert model.downstream() == {"layer0": "layer1", "layer1": "layer2"}
    for tap, nxt in model.downstream().items():  # the next layer reads this one's ReLU
        np.testing.assert_allclose(out.record[nxt], jax.nn.relu(out.preactivations[tap]))
        np.testing.assert_array_equal(out.active[tap], out.preactivations[tap] > 0)
    assert np.all(out.active["layer2"])  # the logits have no ReLU
    local = model.local_pass(out.record, x, labels)
    for name, z in out.preactivations.items():
        np.testing.assert_allclose(local.preactivations[name], z, rtol=1e-6)
    assert local.loss == 0
    bumped = model(x, perturbation={"layer2": jnp.ones((5, 4))})
    np.testing.assert_allclose(bumped, logits + 1, rtol=1e-6)
