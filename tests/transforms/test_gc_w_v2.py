"""Unit tests of GC-W v2 (``gcgd_jax.transforms.gc_w_v2``).

The shared conformance checks run on it through its cases in
``test_conformance.py``; learning evidence is in ``test_gc_w_learning.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gcgd_jax.transforms.gc_w_v2 import (
    GCWv2Predictor,
    GCWv2State,
    gc_w_v2,
    gc_w_v2_effective_filter,
    gc_w_v2_features,
    gc_w_v2_memory_floats,
    gc_w_v2_objective,
    gc_w_v2_offset,
    gc_w_v2_states,
)
from gcgd_jax.transforms.grokfast_ema import grokfast_ema
from gcgd_jax.transforms.mars_correction import mars_correction

PARAMS = {"conv": jnp.zeros((3, 3, 2, 4)), "dense": jnp.zeros((5, 3)), "bias": jnp.zeros(3)}
KERNELS = ("conv", "dense")


def grad_stream(steps, *, seed=0, scale=1.0, dtype=jnp.float32, params=PARAMS):
    """Random gradients with a persistent part (so there is something to learn)."""
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.key(seed)
    base = [jax.random.normal(jax.random.fold_in(key, i), x.shape) for i, x in enumerate(leaves)]
    out = []
    for t in range(steps):
        noise = [
            jax.random.normal(jax.random.fold_in(key, 1000 * (t + 1) + i), x.shape)
            for i, x in enumerate(leaves)
        ]
        out.append(
            jax.tree.unflatten(
                treedef, [(scale * (b + n)).astype(dtype) for b, n in zip(base, noise)]
            )
        )
    return out


DECAYS = (0.5, 0.9, 0.98)  # 0.98: Grokfast's alpha, for the expressiveness tests


@functools.cache
def _step(decays, horizon):
    """One compiled update per static configuration; rho, lr and warmup are traced
    (so most tests share a compilation: the suite stays fast on 2 cores)."""

    def step(g, s, rho, lr, warmup):
        tx = gc_w_v2(
            rho=rho, predictor_learning_rate=lr, warmup=warmup, decays=decays, horizon=horizon
        )
        return tx.update(g, s)

    return jax.jit(step)


def run(grads, *, rho=1.0, lr=1e-2, warmup=0, horizon=1, decays=DECAYS, params=PARAMS, state=None):
    """All updates and states of gc_w_v2(...) over ``grads``."""
    step = _step(decays, horizon)
    state = gc_w_v2(decays=decays, horizon=horizon).init(params) if state is None else state
    outs, states = [], []
    for g in grads:
        u, state = step(g, state, rho, lr, warmup)
        outs.append(u)
        states.append(state)
    return outs, states


def rel(u, g):
    u, g = np.asarray(u, np.float64), np.asarray(g, np.float64)
    return float(np.linalg.norm(u - g) / np.linalg.norm(g))


def np_features(grads, name, t, decays):
    """NumPy reference of the normalised tokens of step ``t`` from grads[0..t] only."""
    gs = [np.asarray(g[name], np.float64).ravel() for g in grads[: t + 1]]
    emas = [gs[0].copy() for _ in decays]
    for g in gs[1:]:
        emas = [b * m + (1 - b) * g for b, m in zip(decays, emas)]
    prev = gs[t - 1] if t >= 1 else gs[0]
    raw = np.stack([gs[t], *emas, gs[t] - prev])
    s = np.sqrt(np.mean(raw**2))
    return raw / s, s


# --------------------------------------------------------------------------- identity


def test_identity_at_start_and_until_the_first_predictor_step():
    grads = grad_stream(4)
    outs, states = run(grads, horizon=2)
    for t in range(2):  # no stored input yet: no training, the zero-init predictor
        assert int(states[t].predictor_steps) == 0
        jax.tree.map(np.testing.assert_array_equal, outs[t], grads[t])
    assert int(states[2].predictor_steps) == 1  # first training at step k = 2 ...
    assert all(rel(outs[2][n], grads[2][n]) > 0 for n in KERNELS)  # ... applied at once
    for t in range(4):
        np.testing.assert_array_equal(outs[t]["bias"], grads[t]["bias"])  # ndim < 2


def test_non_kernel_leaves_pass_through_and_hold_no_state():
    params = {"k": jnp.zeros((4, 3)), "b": jnp.zeros(3), "step": jnp.zeros((2, 2), jnp.int32)}
    tx = gc_w_v2()
    state = tx.init(params)
    assert isinstance(state.emas["b"], optax.MaskedNode)
    assert isinstance(state.predictor.a["step"], optax.MaskedNode)
    g = {"k": jnp.ones((4, 3)), "b": jnp.arange(3.0), "step": np.zeros((2, 2), jax.dtypes.float0)}
    out, _ = jax.jit(tx.update)(g, state, params)
    np.testing.assert_array_equal(out["b"], g["b"])
    assert out["step"].dtype == jax.dtypes.float0
    # No kernel at all: the identity, the state untouched.
    only = {"b": jnp.arange(3.0)}
    s = tx.init(only)
    out, s2 = tx.update(only, s)
    assert out["b"] is only["b"] and s2 is s


# --------------------------------------------------------------------------- bound


@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0, 3.0])
def test_offset_is_bounded_per_tensor(rho):
    grads = grad_stream(15)
    outs, _ = run(grads, rho=rho, lr=0.1)
    worst = 0.0
    for u, g in zip(outs, grads):
        for n in KERNELS:
            r = rel(u[n], g[n])
            assert r <= rho * (1 + 1e-5) + 1e-7, (n, r)
            worst = max(worst, r)
    if rho == 0.0:
        assert worst == 0.0
    else:
        assert worst > 0.9 * rho  # the objective drives the offset to the bound


# --------------------------------------------------------------------------- target leak


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_training_input_precedes_its_target(horizon):
    """At step t the predictor takes one Adam step on -J with the input of step
    t-k (from gradients 0..t-k only) and the target mean(G_{t-k+1..t}): recomputed
    here from NumPy features. A version that trained on this step's input, or put
    the input's own gradient in the target, fails."""
    decays, rho, lr, t = DECAYS, 0.7, 0.05, 6
    grads = grad_stream(t + 1)
    _, states = run(grads, rho=rho, lr=lr, horizon=horizon)
    before, after = states[t - 1], states[t]
    adam = optax.adam(lr)

    def neg_j(pred):
        total = 0.0
        for n in KERNELS:
            x, _ = np_features(grads, n, t - horizon, decays)
            target = sum(
                np.asarray(grads[j][n], np.float64).ravel() for j in range(t - horizon + 1, t + 1)
            )
            p = {f: getattr(pred, f)[n] for f in GCWv2Predictor._fields}
            total = (
                total
                + gc_w_v2_objective(
                    p, jnp.asarray(x, jnp.float32), jnp.asarray(target, jnp.float32), rho
                )[0]
            )
        return -total

    g = jax.jit(jax.grad(neg_j))(before.predictor)
    upd, _ = adam.update(g, before.predictor_opt_state, before.predictor)
    expected = optax.apply_updates(before.predictor, upd)
    for n in KERNELS:
        for f in GCWv2Predictor._fields:
            np.testing.assert_allclose(
                getattr(after.predictor, f)[n], getattr(expected, f)[n], rtol=1e-4, atol=1e-6
            )
    # ... and the ring holds the last k inputs, this step's among them (the latest
    # rebuilt from the EMAs and previous gradient, the older ones stored).
    for j in range(t - horizon + 1, t + 1):
        x_j, s_j = np_features(grads, "dense", j, decays)
        np.testing.assert_allclose(after.stored["dense"][j % horizon], x_j, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after.stored_scale["dense"][j % horizon], s_j, rtol=1e-5)
    # A future gradient cannot change this step's update (causality of the stream).
    np.testing.assert_allclose(
        float(after.objective), -float(neg_j(before.predictor)) / 2, rtol=1e-4
    )


# --------------------------------------------------------------------------- expressiveness


def _hand_set(state, tokens, via_attention):
    """Predictor that outputs Σ_j a_j x_j: through the linear filter or uniform attention."""

    def leaf(p):
        h, t = p.w_v.shape[0], p.a.shape[0]
        a = jnp.zeros(t).at[jnp.asarray(list(tokens))].set(jnp.asarray(list(tokens.values())))
        if not via_attention:
            return p._replace(w_v=jnp.zeros_like(p.w_v), a=a)
        return p._replace(
            w_q=jnp.zeros_like(p.w_q),
            b_q=jnp.zeros_like(p.b_q),
            w_v=jnp.broadcast_to(t * a / h, (h, t)),
            a=jnp.zeros(t),
        )

    pred = state.predictor
    new = {f: dict(getattr(pred, f)) for f in GCWv2Predictor._fields}
    for n in KERNELS:
        p = leaf(GCWv2Predictor(**{f: getattr(pred, f)[n] for f in GCWv2Predictor._fields}))
        for f in GCWv2Predictor._fields:
            new[f][n] = getattr(p, f)
    return state._replace(predictor=GCWv2Predictor(**new))


def _offsets(state, grads):
    outs, _ = run(grads, rho=1e3, lr=0.0, state=state)
    out = []
    for g, u in zip(grads, outs):
        out.append(
            {n: np.asarray(u[n], np.float64) - np.asarray(g[n], np.float64) for n in KERNELS}
        )
    return out


@pytest.mark.parametrize("via_attention", [False, True], ids=["linear", "attention"])
def test_reproduces_mars_approx_exactly(via_attention):
    gamma, beta1 = 0.025, 0.95
    diff_token = len(DECAYS) + 1
    state = _hand_set(
        gc_w_v2(decays=DECAYS).init(PARAMS),
        {diff_token: gamma * beta1 / (1 - beta1)},
        via_attention,
    )
    grads = grad_stream(8)
    got = _offsets(state, grads)
    ref_tx = mars_correction(gamma=gamma, beta1=beta1, max_norm=None)
    rs = ref_tx.init(PARAMS)
    for g, o in zip(grads, got):
        c, rs = ref_tx.update(g, rs)
        for n in KERNELS:
            expected = np.asarray(c[n], np.float64) - np.asarray(g[n], np.float64)
            np.testing.assert_allclose(o[n], expected, rtol=0, atol=1e-5)
    assert max(np.abs(o["conv"]).max() for o in got) > 0.1  # not vacuous


@pytest.mark.parametrize("via_attention", [False, True], ids=["linear", "attention"])
def test_reproduces_grokfast_ema_exactly(via_attention):
    alpha, lamb = 0.98, 2.0
    state = _hand_set(
        gc_w_v2(decays=DECAYS).init(PARAMS), {1 + DECAYS.index(alpha): lamb}, via_attention
    )
    grads = grad_stream(8)
    got = _offsets(state, grads)
    ref_tx = grokfast_ema(alpha=alpha, lamb=lamb)
    rs = ref_tx.init(PARAMS)
    for g, o in zip(grads, got):
        c, rs = ref_tx.update(g, rs)
        for n in KERNELS:
            expected = np.asarray(c[n], np.float64) - np.asarray(g[n], np.float64)
            np.testing.assert_allclose(o[n], expected, rtol=0, atol=1e-5)
            assert np.abs(expected).max() > 1.0


def test_effective_filter_recovers_a_linear_predictor():
    state = _hand_set(gc_w_v2(decays=DECAYS).init(PARAMS), {0: -0.5, 2: 1.5}, via_attention=True)
    grads = grad_stream(5)
    _, states = run(grads, rho=1e3, lr=0.0, state=state)
    x, _ = gc_w_v2_features(grads[4]["dense"], states[4].emas["dense"], grads[3]["dense"])
    p = {f: getattr(state.predictor, f)["dense"] for f in GCWv2Predictor._fields}
    c, r2 = gc_w_v2_effective_filter(p, x)
    np.testing.assert_allclose(c, [-0.5, 0, 1.5, 0, 0], atol=1e-4)
    assert float(r2) > 0.999


def _reference_offset(p, x):
    """The unbounded offset as the docstring writes it: queries ``(h, d, n)``, keys
    ``x_ij u + e_j``, ``jax.nn.softmax`` over the token axis (what gc_w_v2 computed
    before its per-row rewrite with the query folded into the keys)."""
    d = p["w_q"].shape[1]
    q = jnp.einsum("hdt,tn->hdn", p["w_q"], x) + p["b_q"][:, :, None]
    qu = jnp.einsum("hdn,hd->hn", q, p["u_k"])
    qe = jnp.einsum("hdn,htd->htn", q, p["e_k"])
    attn = jax.nn.softmax((x[None] * qu[:, None, :] + qe) / math.sqrt(d), axis=1)
    return jnp.sum(attn * p["w_v"][:, :, None] * x[None], axis=(0, 1)) + p["a"] @ x


@pytest.mark.parametrize("heads, size", [(2, 8), (3, 4)])
def test_offset_and_its_gradient_match_the_direct_formula(heads, size):
    """The offset and its reverse-mode gradient (hand-written) equal the direct
    formula's (``jax.grad`` of ``_reference_offset``) to float32 rounding."""
    state = gc_w_v2(decays=DECAYS, num_heads=heads, head_size=size).init(PARAMS)
    keys = jax.random.split(jax.random.key(3), 6)
    p = {f: getattr(state.predictor, f)["conv"] for f in GCWv2Predictor._fields}
    p["b_q"] = jax.random.normal(keys[0], p["b_q"].shape)
    p["w_v"] = jax.random.normal(keys[1], p["w_v"].shape)
    p["a"] = jax.random.normal(keys[2], p["a"].shape)
    x = 2.0 * jax.random.normal(keys[3], (len(DECAYS) + 2, 300))
    t = jax.random.normal(keys[4], (300,))
    got = gc_w_v2_offset(p, x, 1e6)  # far above ||ΔX|| / ||x_0||: unbounded
    want = _reference_offset(p, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))
    loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * t), argnums=(0, 1)))
    (gp, gx) = loss(lambda p, x: gc_w_v2_offset(p, x, 1e6))(p, x)
    (rp, rx) = loss(_reference_offset)(p, x)
    for f in GCWv2Predictor._fields:
        scale = float(jnp.max(jnp.abs(rp[f])))
        assert scale > 0, f
        np.testing.assert_allclose(gp[f], rp[f], rtol=0, atol=1e-5 * scale, err_msg=f)
    np.testing.assert_allclose(gx, rx, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(rx))))


# --------------------------------------------------------------------------- non-finite


def test_non_finite_step_passes_gradient_and_keeps_state():
    grads = grad_stream(5)
    _, states = run(grads[:4], horizon=2)
    state = states[-1]
    bad = dict(grads[4])
    bad["dense"] = bad["dense"].at[1, 1].set(jnp.inf)
    bad["conv"] = bad["conv"].at[0, 0, 0, 0].set(jnp.nan)
    (out,), (new_state,) = run([bad], horizon=2, state=state)
    jax.tree.map(np.testing.assert_array_equal, out, bad)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e6, 1e30, 3e38])
def test_extreme_but_finite_inputs_and_zero_gradients_stay_finite(scale):
    grads = grad_stream(4)
    _, states = run(grads, lr=0.1)
    state = states[-1]
    g = jax.tree.map(lambda x: jnp.clip(x * scale, -3e38, 3e38), grads[0])  # at float32's limit
    zero = jax.tree.map(jnp.zeros_like, g)
    for inp in (g, zero, g, zero):
        (out,), (state,) = run([inp], lr=0.1, state=state)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(out))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
        if inp is zero:  # ||ΔG|| <= rho ||G|| = 0
            jax.tree.map(np.testing.assert_array_equal, out, inp)


def test_scale_equivariance():
    grads = grad_stream(6)
    outs, states = run(grads)
    souts, sstates = run([jax.tree.map(lambda x: 1e3 * x, g) for g in grads])
    for u, su in zip(outs, souts):
        for n in KERNELS:
            np.testing.assert_allclose(su[n], 1e3 * u[n], rtol=2e-4, atol=0)
    np.testing.assert_allclose(states[-1].objective, sstates[-1].objective, rtol=1e-4)


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_preserved_and_state_avals_stable(dtype):
    params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
    grads = grad_stream(4, dtype=dtype)
    s0 = gc_w_v2(decays=DECAYS).init(params)
    outs, states = run(grads, params=params)
    aval = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
    assert aval(states[-1]) == aval(s0)
    for u in outs:
        assert all(x.dtype == dtype for x in jax.tree.leaves(u))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(s0))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"rho": -1.0}, "rho"),
        ({"decays": ()}, "decays"),
        ({"decays": (0.5, 1.0)}, "decays"),
        ({"decays": 0.9}, "decays"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": 1.5}, "horizon"),
        ({"num_heads": 0}, "num_heads"),
        ({"head_size": True}, "head_size"),
        ({"predictor_learning_rate": -1.0}, "predictor_learning_rate"),
        ({"warmup": -1}, "warmup"),
        ({"key": True}, "key"),
        ({"key": "seed"}, "key"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        gc_w_v2(**kwargs).init(PARAMS)


def test_warmup_trains_but_does_not_apply():
    grads = grad_stream(6)
    outs, states = run(grads, warmup=4)
    for t in range(4):
        jax.tree.map(np.testing.assert_array_equal, outs[t], grads[t])
    assert int(states[3].predictor_steps) == 3
    assert rel(outs[4]["dense"], grads[4]["dense"]) > 0


def test_key_sets_the_random_weights_only():
    a, b = gc_w_v2(key=1).init(PARAMS), gc_w_v2(key=jax.random.key(2)).init(PARAMS)
    assert not np.array_equal(a.predictor.w_q["conv"], b.predictor.w_q["conv"])
    np.testing.assert_array_equal(a.predictor.w_v["conv"], 0.0)
    assert a.predictor.e_k["dense"].shape == (2, 5, 8)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("k", [1, 2, 3])
def test_memory_formula_matches_the_state(k):
    h, d, decays = 3, 4, (0.5, 0.9)
    t = len(decays) + 2
    c = gc_w_v2_memory_floats(PARAMS, num_heads=h, head_size=d, horizon=k, decays=decays)
    kernels = [x for x in jax.tree.leaves(PARAMS) if x.ndim >= 2]
    n = sum(x.size for x in kernels)
    pred = h * (2 * t * d + 2 * d + t) + t
    # EMAs, previous gradient and difference token; k-1 stored feature sets; k scales.
    assert c["buffers"] == (len(decays) + 2 + (k - 1) * t) * n + k * len(kernels)
    assert c["predictor"] == pred * len(kernels)
    assert c["predictor_adam"] == 2 * pred * len(kernels) + 1
    assert c["bytes"] == 4 * c["total"]
    state = gc_w_v2(num_heads=h, head_size=d, horizon=k, decays=decays).init(PARAMS)
    assert all(x.size > 0 for x in jax.tree.leaves(state))  # orbax saves no zero-size array
    # The compatibility view keeps the k-slot ring's shapes.
    assert state.stored["conv"].shape == (k, t, 3 * 3 * 2 * 4)
    assert state.stored_scale["dense"].shape == (k,)


# --------------------------------------------------------------------------- data parallel


def test_two_devices_equal_one_device():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 2 fake CPU devices)")
    mesh = jax.make_mesh((2,), ("data",), devices=devices[:2])
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "conv": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)),
        "dense": 0.3 * jax.random.normal(k2, (4, 3)),
        "bias": jnp.zeros(3),
    }

    def loss_fn(p, x, y):
        h = jax.lax.conv_general_dilated(
            x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        logits = jnp.tanh(h).mean(axis=(1, 2)) @ p["dense"] + p["bias"]
        return jnp.mean((logits - y) ** 2)

    tx = optax.chain(gc_w_v2(horizon=2), optax.sgd(0.1, momentum=0.9))

    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    xs = jax.random.normal(k3, (6, 8, 5, 5, 2))
    ys = jax.random.normal(jax.random.fold_in(k3, 1), (6, 8, 3))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
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
    (inner,) = gc_w_v2_states(s2)
    assert isinstance(inner, GCWv2State) and int(inner.predictor_steps) == 4
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)
    assert p2["dense"].sharding.is_fully_replicated
    assert math.isfinite(float(inner.objective))
