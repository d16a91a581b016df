"""Unit tests of GC-W (``gcgd_jax.transforms.gc_w``).

The shared conformance checks (jit, extra args, no recompilation, inject_hyperparams,
masked, MultiSteps, lax.cond, map_params, dtypes, convergence) run on GC-W via its
case in ``test_conformance.py``; learning evidence is in ``test_gc_w_learning.py``.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

gc_w_module = importlib.import_module("gcgd_jax.transforms.gc_w")
from gcgd_jax.transforms.gc_w import (
    GCWState,
    gc_w,
    gc_w_memory_floats,
    gc_w_predictor_loss,
    gc_w_states,
)

PARAMS = {"conv": jnp.zeros((3, 3, 2, 4)), "dense": jnp.zeros((5, 3))}


def grad_stream(steps, *, seed=0, scale=1.0, dtype=jnp.float32, shapes=None):
    """A sequence of random gradients with a persistent part (so there is signal)."""
    shapes = shapes or jax.tree.map(jnp.shape, PARAMS)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    key = jax.random.key(seed)
    base = [jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(leaves)]
    out = []
    for t in range(steps):
        noise = [
            jax.random.normal(jax.random.fold_in(key, 1000 * (t + 1) + i), s)
            for i, s in enumerate(leaves)
        ]
        out.append(
            jax.tree.unflatten(
                treedef, [(scale * (b + n)).astype(dtype) for b, n in zip(base, noise)]
            )
        )
    return out


def run(tx, grads, params=PARAMS):
    """All updates and states of ``tx`` over ``grads`` (one jitted update)."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    outs, states = [], []
    for g in grads:
        u, state = update(g, state, params)
        outs.append(u)
        states.append(state)
    return outs, states


def rel_delta(u, g):
    return float(
        jnp.linalg.norm((u - g).astype(jnp.float32)) / jnp.linalg.norm(g.astype(jnp.float32))
    )


# --------------------------------------------------------------------------- identity


def test_identity_until_the_first_predictor_step():
    grads = grad_stream(6)
    outs, states = run(gc_w(window=3, warmup=0), grads)
    for t in range(3):  # steps 0..2: no predictor step yet, the zero-init predictor
        assert int(states[t].predictor_steps) == 0
        jax.tree.map(np.testing.assert_array_equal, outs[t], grads[t])
    # Step 3 closes the first window: one predictor step, and the updated
    # predictor is applied at once (on every selected leaf).
    assert int(states[3].predictor_steps) == 1
    for t in (3, 4):
        assert all(
            rel_delta(u, g) > 0 for u, g in zip(jax.tree.leaves(outs[t]), jax.tree.leaves(grads[t]))
        ), t
    assert int(states[4].predictor_steps) == 1  # no new window closed at step 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_warmup_passes_gradients_unchanged_while_the_predictor_trains(dtype):
    grads = grad_stream(8, dtype=dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
    outs, states = run(gc_w(window=2, warmup=6), grads, params)
    for t in range(6):
        jax.tree.map(np.testing.assert_array_equal, outs[t], grads[t])
        assert all(u.dtype == dtype for u in jax.tree.leaves(outs[t]))
    assert int(states[5].predictor_steps) == 2  # trained at steps 2 and 4
    assert float(states[5].predictor_loss) > 0
    changed = [rel_delta(u, g) for u, g in zip(jax.tree.leaves(outs[6]), jax.tree.leaves(grads[6]))]
    assert max(changed) > 0


# --------------------------------------------------------------------------- bound


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.5])
def test_offset_is_bounded_per_tensor(rho):
    tx = gc_w(rho=rho, window=1, warmup=0, predictor_learning_rate=0.3)
    grads = grad_stream(12)
    outs, _ = run(tx, grads)
    worst = 0.0
    for u, g in zip(outs, grads):
        for ul, gl in zip(jax.tree.leaves(u), jax.tree.leaves(g)):
            worst = max(worst, rel_delta(ul, gl))
            assert rel_delta(ul, gl) <= rho * (1 + 1e-5) + 1e-7
    if rho == 0.0:
        for u, g in zip(outs, grads):
            jax.tree.map(np.testing.assert_array_equal, u, g)
    else:
        assert worst > 0.5 * rho  # the large predictor lr reaches the bound


# --------------------------------------------------------------------------- non-finite


def test_non_finite_step_passes_gradient_and_keeps_state():
    tx = gc_w(window=2, warmup=0)
    grads = grad_stream(5)
    _, states = run(tx, grads[:4])
    state = states[-1]
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[4])
    bad["dense"] = bad["dense"].at[1, 1].set(jnp.inf)
    out, new_state = jax.jit(tx.update)(bad, state, PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, bad)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_apply_if_finite_skips_the_step_and_gc_w_state():
    tx = optax.apply_if_finite(optax.chain(gc_w(window=2, warmup=0), optax.sgd(0.1)), 3)
    grads = grad_stream(4)
    _, states = run(tx, grads[:3])
    state = states[-1]
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[3])
    out, new_state = jax.jit(tx.update)(bad, state, PARAMS)
    assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(out))  # zero update
    assert int(new_state.notfinite_count) == 1
    jax.tree.map(np.testing.assert_array_equal, gc_w_states(new_state)[0], gc_w_states(state)[0])


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30, 3e38])
def test_extreme_but_finite_inputs_give_finite_outputs(scale):
    tx = gc_w(window=1, warmup=0, predictor_learning_rate=0.3)
    grads = grad_stream(4, scale=1.0)
    _, states = run(tx, grads)  # a trained predictor
    state = states[-1]
    g = jax.tree.map(lambda x: jnp.clip(x * scale, -3e38, 3e38), grads[0])
    zero = jax.tree.map(jnp.zeros_like, g)
    for inp in (g, zero, g, zero):  # zero gradient with a non-zero history, and back
        out, state = jax.jit(tx.update)(inp, state, PARAMS)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(out))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
        if inp is zero:
            jax.tree.map(np.testing.assert_array_equal, out, inp)


# --------------------------------------------------------------------------- scale-free


@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_scale_equivariance(factor):
    """Inputs are normalised by rms(G): scaling every gradient by c scales the
    updates by c and leaves the predictor (and its loss) unchanged."""
    tx = gc_w(window=2, warmup=0)
    grads = grad_stream(7)
    outs, states = run(tx, grads)
    souts, sstates = run(tx, [jax.tree.map(lambda g: g * factor, g) for g in grads])
    for u, su in zip(outs, souts):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(b, a * factor, rtol=2e-4, atol=0), u, su
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
        states[-1].predictor,
        sstates[-1].predictor,
    )
    np.testing.assert_allclose(states[-1].predictor_loss, sstates[-1].predictor_loss, rtol=1e-4)


# --------------------------------------------------------------------------- target


@pytest.mark.parametrize("target", ["window_mean", "next_gradient"])
def test_target_uses_strictly_future_gradients(target):
    k = 3
    tx = gc_w(window=k, warmup=0, target=target, beta=0.5)
    grads = grad_stream(k + 1)
    _, states = run(tx, grads[:k])
    s = states[-1]
    jax.tree.map(np.testing.assert_array_equal, s.stored_grad, grads[0])
    jax.tree.map(np.testing.assert_array_equal, s.stored_ema, grads[0])  # bias-corrected
    if target == "window_mean":
        expected = jax.tree.map(lambda a, b: (a + b) / k, grads[1], grads[2])
    else:
        expected = grads[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s.target_sum, expected)
    # Step k closes the window: the loss is that of the stored inputs against D.
    if target == "window_mean":
        d = jax.tree.map(lambda a, b, c: (a + b + c) / k, grads[1], grads[2], grads[3])
    else:
        d = grads[1]
    _, s2 = jax.jit(tx.update)(grads[k], s, PARAMS)
    assert int(s2.predictor_steps) == 1
    losses = []
    for name in PARAMS:
        p = {f: getattr(s.predictor, f)[name] for f in gc_w_module.GCWPredictor._fields}
        loss, _ = gc_w_module._leaf_loss(
            p, grads[0][name], grads[0][name], d[name], 0.5, 0.1, 1, 32
        )
        losses.append(float(loss))
    np.testing.assert_allclose(float(s2.predictor_loss), np.mean(losses), rtol=1e-5)
    # ... and the new window starts at step k.
    jax.tree.map(np.testing.assert_array_equal, s2.stored_grad, grads[k])
    assert all(not bool(jnp.any(t)) for t in jax.tree.leaves(s2.target_sum))


# --------------------------------------------------------------------------- leaves


def test_bias_and_other_leaves_are_an_error_naming_the_path():
    tx = gc_w()
    params = {"layer": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\]"):
        tx.init(params)
    with pytest.raises(ValueError, match=r"\['step'\]"):
        tx.init({"k": jnp.zeros((3, 4)), "step": jnp.zeros((2, 2), jnp.int32)})
    state = tx.init({"layer": {"kernel": jnp.zeros((3, 4))}})
    with pytest.raises(ValueError, match=r"\['layer'\]\['bias'\]"):
        tx.update({"layer": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}, state)


def test_inside_optax_masked_with_biases_masked_out():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)},
        "dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
    }
    mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.masked(gc_w(window=2, warmup=0), mask), optax.sgd(1.0))
    grads = grad_stream(6, shapes=jax.tree.map(jnp.shape, params))
    outs, states = run(tx, grads, params)
    for u, g in zip(outs, grads):
        np.testing.assert_array_equal(u["conv"]["bias"], -g["conv"]["bias"])
        np.testing.assert_array_equal(u["dense"]["bias"], -g["dense"]["bias"])
    (inner,) = gc_w_states(states[-1])
    assert isinstance(inner.ema["conv"]["bias"], optax.MaskedNode)
    assert int(inner.predictor_steps) == 2
    assert float(gc_w_predictor_loss(states[-1])) == float(inner.predictor_loss) > 0
    assert rel_delta(outs[-1]["conv"]["kernel"], -grads[-1]["conv"]["kernel"]) > 0


def test_predictor_loss_helper_errors_without_gc_w():
    with pytest.raises(ValueError, match="no GCWState"):
        gc_w_predictor_loss(optax.sgd(0.1).init(PARAMS))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"warmup": -1}, "warmup"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"num_heads": 0}, "num_heads"),
        ({"head_size": 1.5}, "head_size"),
        ({"predictor_learning_rate": -1e-3}, "predictor_learning_rate"),
        ({"scale_weight": -1.0}, "scale_weight"),
        ({"target": "future"}, "target"),
        ({"key": True}, "key"),
        ({"key": "seed"}, "key"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        gc_w(**kwargs).init(PARAMS)


def test_heads_and_key_options():
    tx = gc_w(num_heads=2, head_size=4, key=jax.random.key(3))
    state = tx.init(PARAMS)
    assert state.predictor.w_q["conv"].shape == (18, 8)
    assert state.predictor.w_o["dense"].shape == (8, 5)
    same = gc_w(num_heads=2, head_size=4, key=jax.random.key(3)).init(PARAMS)
    other = gc_w(num_heads=2, head_size=4, key=4).init(PARAMS)
    np.testing.assert_array_equal(state.predictor.w_q["conv"], same.predictor.w_q["conv"])
    assert not np.array_equal(state.predictor.w_q["conv"], other.predictor.w_q["conv"])


# --------------------------------------------------------------------------- memory


def test_memory_formula_matches_the_state():
    h, d = 2, 8
    counts = gc_w_memory_floats(PARAMS, num_heads=h, head_size=d)
    n_sel = sum(p.size for p in jax.tree.leaves(PARAMS))
    pred = sum(4 * math.prod(p.shape[:-1]) * h * d + 4 * h * d + 2 for p in jax.tree.leaves(PARAMS))
    assert counts["buffers"] == 4 * n_sel
    assert counts["predictor"] == pred
    assert counts["predictor_adam"] == 2 * pred + 1
    assert counts["total"] == 4 * n_sel + 3 * pred + 4
    assert counts["bytes"] == 4 * counts["total"]


# --------------------------------------------------------------------------- checkpoint


def test_state_round_trips_through_numpy():
    tx = gc_w(window=2, warmup=0)
    grads = grad_stream(8)
    outs, states = run(tx, grads)
    leaves, treedef = jax.tree.flatten(states[4])
    restored = jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x)) for x in leaves])
    u = restored
    update = jax.jit(tx.update)
    for t in range(5, 8):
        out, u = update(grads[t], u, PARAMS)
        jax.tree.map(np.testing.assert_array_equal, out, outs[t])


# --------------------------------------------------------------------------- data parallel


def test_data_parallel_step_matches_single_device():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 2 fake CPU devices)")
    mesh = jax.make_mesh((2,), ("data",), devices=devices[:2])
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "conv": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)),
        "dense": 0.3 * jax.random.normal(k2, (4, 3)),
    }

    def loss_fn(p, x, y):
        h = jax.lax.conv_general_dilated(
            x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        logits = jnp.tanh(h).mean(axis=(1, 2)) @ p["dense"]
        return jnp.mean((logits - y) ** 2)

    tx = optax.chain(gc_w(window=2, warmup=0), optax.sgd(0.1, momentum=0.9))

    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    xs = jax.random.normal(k3, (6, 8, 5, 5, 2))
    ys = jax.random.normal(jax.random.fold_in(k3, 1), (6, 8, 3))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    single = jax.jit(step)
    sharded = jax.jit(
        step,
        in_shardings=(replicated, replicated, batch, batch),
        out_shardings=(replicated, replicated),
    )
    p1, s1 = params, tx.init(params)
    p2, s2 = jax.device_put((params, tx.init(params)), replicated)
    for t in range(6):
        p1, s1 = single(p1, s1, xs[t], ys[t])
        p2, s2 = sharded(p2, s2, jax.device_put(xs[t], batch), jax.device_put(ys[t], batch))
    assert int(gc_w_states(s2)[0].predictor_steps) == 2
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)
    assert p2["dense"].sharding.is_fully_replicated
    assert isinstance(gc_w_states(s2)[0], GCWState)
