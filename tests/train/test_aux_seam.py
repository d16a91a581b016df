"""The model-side seam: a model's named auxiliary outputs reach the objective, the step's
metrics, the epoch sums and the epoch record with no method named in the training code.

The model here is not GC-ODE (a toy with its own penalty, statistic and gradient
probe), so these tests fail if the train step or the trainer special-case GC-ODE.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gcgd_jax.models import AuxSpec
from gcgd_jax.train.step import StepOptions, TrainState, make_train_step
from gcgd_jax.train.trainer import EpochAccount, EpochSums, Trainer


class Toy(nnx.Module):
    """Dense logits; aux: a weight penalty and an input statistic; probe: added to the input."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, *, return_aux=False, fusion_breaker=None, aux_probe=None):
        h = x.reshape(x.shape[0], -1)
        if aux_probe is not None:
            h = h + aux_probe
        logits = self.dense(h)
        if not return_aux:
            return logits
        aux = {"toy_penalty": jnp.sum(self.dense.kernel[...] ** 2), "toy_stat": jnp.mean(x)}
        return logits, aux

    def new_aux_probe(self):
        return jnp.zeros((), jnp.float32)

    def aux_probe_metrics(self, probe_grad):
        return {"toy_probe": probe_grad}


SPEC = AuxSpec(
    loss_weights=(("toy_penalty", 0.5),),
    metrics=(("toy_penalty", "mean"), ("toy_stat", "last"), ("toy_probe", "mean")),
    probe=True,
)


def _setup(aux: AuxSpec):
    model = Toy(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))  # lr is logged
    state = TrainState(
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(0),
        nonfinite=jnp.zeros((), jnp.int32),
        halted=jnp.zeros((), jnp.bool_),
    )
    opts = StepOptions(mean=(0.0,), std=(1.0,), aux=aux)  # the model sees images / 255
    images = np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1) * 10
    labels = np.array([0, 1, 2, 0], np.int32)
    step = jax.jit(make_train_step(graphdef, tx, opts))
    return model, state, step, images, labels


def test_the_spec_decides_the_objective_and_the_logged_metrics():
    model, state, step, images, labels = _setup(SPEC)
    new_state, metrics = step(state, images, labels, jnp.float32(1.0))
    x = jnp.asarray(images, jnp.float32) / 255.0

    def objective(params):
        m = nnx.merge(nnx.graphdef(model), params, nnx.state(model, nnx.Not(nnx.Param)))
        logits = m(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + 0.5 * jnp.sum(params["dense"]["kernel"][...] ** 2), ce

    (_, ce), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    expected = optax.apply_updates(state.params, jax.tree.map(lambda g: -0.1 * g, grads))
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(ce), rel=1e-5)  # the data loss alone
    kernel = state.params["dense"]["kernel"][...]
    assert float(metrics["toy_penalty"]) == pytest.approx(float(jnp.sum(kernel**2)), rel=1e-5)
    assert float(metrics["toy_stat"]) == pytest.approx(float(jnp.mean(x)), rel=1e-5)

    # the probe's gradient: d(ce)/d(probe) = sum of d(ce)/dh over the batch and features
    def with_probe(p):
        m = nnx.merge(nnx.graphdef(model), state.params, nnx.state(model, nnx.Not(nnx.Param)))
        logits = m(x, aux_probe=p)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    assert float(metrics["toy_probe"]) == pytest.approx(float(jax.grad(with_probe)(0.0)), rel=1e-4)


def test_without_a_spec_the_model_is_called_plainly_and_logs_nothing_of_its_own():
    _, state, step, images, labels = _setup(AuxSpec())
    _, metrics = step(state, images, labels, jnp.float32(1.0))
    assert set(metrics) == {"loss", "correct", "finite", "lr"}


def test_epoch_sums_and_records_reduce_each_metric_by_name():
    cfg = types.SimpleNamespace(
        data=types.SimpleNamespace(batch_size=4),
        train=types.SimpleNamespace(nan_policy="stop"),
        log=types.SimpleNamespace(tensorboard=False, tensorboard_every_steps=0),
    )
    trainer = types.SimpleNamespace(
        cfg=cfg,
        step_options=types.SimpleNamespace(aux=SPEC),
        state_metric_keys=(),
        steps_per_epoch=3,
    )
    bar = types.SimpleNamespace(update=lambda *a: None)
    sums = EpochSums()
    account = EpochAccount(trainer, 0, 0, sums, bar)
    values = [(1.0, 5.0, 0.5), (3.0, 7.0, 1.5), (float("nan"), 9.0, 9.0)]
    for i, (penalty, stat, probe) in enumerate(values, start=1):
        m = {"loss": 1.0, "correct": 1, "lr": 0.1, "finite": np.isfinite(penalty)}
        m |= {"toy_penalty": penalty, "toy_stat": stat, "toy_probe": probe}
        account.complete({k: np.asarray(v) for k, v in m.items()}, i)
        if i == 2:
            trainer.cfg.train.nan_policy = "skip"  # the 3rd step is skipped, not counted
    assert sums.model_aux == {"toy_penalty": 4.0, "toy_stat": 7.0, "toy_probe": 2.0}
    record = Trainer._epoch_record(trainer, 0, 2, sums, [0.1], 1.0)
    assert (record["toy_penalty"], record["toy_stat"], record["toy_probe"]) == (2.0, 7.0, 1.0)
    # the sums travel through a checkpoint's metadata and come back equal
    import dataclasses

    assert EpochSums.from_checkpoint(dataclasses.asdict(sums)) == sums


def test_a_bad_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction 'median'"):
        AuxSpec(metrics=(("x", "median"),))
