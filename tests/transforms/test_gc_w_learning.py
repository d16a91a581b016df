"""Evidence that GC-W learns, on stochastic problems whose true gradient is known.

Sections: GC-W v1 in closed loop with Adam (below, including the comparison
with a *tuned* baseline, where its speed-up disappears), then GC-W v2 on
open-loop gradient streams with a known optimal linear filter (at the end).

The problem is a noisy quadratic with a dense-kernel parameter ``W`` of shape
``(in, out) = (16, 32)``: ``L(W) = ½‖W - W*‖²``, true gradient ``g = W - W*``,
and the "minibatch" gradient ``G = g + ε`` with

* ``"common"`` noise: ``ε = σ_s ξ 1ᵀ + σ_i η`` (``ξ ∈ R^16``, ``η ∈ R^{16×32}``
  standard normal, fresh every step): a large component shared by all output
  units (like label noise shared across outputs) plus a small independent
  part;
* ``"isotropic"`` noise: ``ε = σ η``, no structure across units.

Why GC-W can learn here: far from the optimum the true gradient changes slowly
(Adam moves each weight by at most ~lr per step) while the noise is white in
time, so the history tokens ``M`` (an EMA of past gradients) carry the signal
with less noise, and the future-window target ``D`` (mean of the next 10 raw
gradients) is a lower-noise estimate of the same slowly moving gradient. The
predictor learns to mix the unit's own history into the current gradient (it
learns a bounded, data-driven momentum). Attention across units could also
cancel the shared noise; on this problem the history route dominates, which
is why the isotropic problem gains as much.

Why optimisation gets faster: the optimizer is Adam, whose per-coordinate step
is ``m/√v``; a less noisy gradient has a smaller ``v`` for the same signal and
gets larger signal steps. (GC-W's scale change alone cannot explain it: Adam
is invariant to a global rescaling of the gradients.)

Where it does not help: at the noise floor (the optimum reached, the true
gradient dominated by the noise the weights absorbed) the future gradients
also reflect the optimizer's own last steps and history is uninformative; the
control test below runs there and only bounds the harm.
``experiments/studies/gc_w_study.py`` runs the same study over more seeds and regimes.

``rho=0`` is the negative control: GC-W then passes the gradient unchanged, and
the "closer than raw" assertions fail (checked below), so the thresholds are
not vacuous.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcgd_jax.transforms.gc_w import gc_w

N_IN, N_OUT = 16, 32
STEPS = 1500
WARMUP = 200
MEASURE_FROM = 300  # after the warm-up and the predictor's first ~10 updates


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _simulate(seed, noise: str, lr: float, rho: float | None, scale0: float):
    """Returns per-step (cos(G, g), cos(Ĝ, g), ‖G-g‖/‖g‖, ‖Ĝ-g‖/‖g‖, loss)."""
    k_init, k_data = jax.random.split(jax.random.key(seed))
    offset = scale0 * jax.random.normal(k_init, (N_IN, N_OUT))  # W0 - W*
    offset = offset - offset.mean(-1, keepdims=True)
    tx = optax.identity() if rho is None else gc_w(rho=rho, warmup=WARMUP)
    opt = optax.adam(lr)

    def step(carry, key):
        d, tx_state, opt_state = carry
        k1, k2 = jax.random.split(key)
        g = d  # true gradient of ½‖W - W*‖²
        if noise == "common":
            eps = 2.0 * jax.random.normal(k1, (N_IN, 1)) + 0.5 * jax.random.normal(
                k2, (N_IN, N_OUT)
            )
        else:
            eps = 2.0 * jax.random.normal(k2, (N_IN, N_OUT))
        raw = g + eps
        corrected, tx_state = tx.update(raw, tx_state)
        updates, opt_state = opt.update(corrected, opt_state)
        cos = lambda a: jnp.sum(a * g) / (jnp.linalg.norm(a) * jnp.linalg.norm(g))
        rel = lambda a: jnp.linalg.norm(a - g) / jnp.linalg.norm(g)
        out = (cos(raw), cos(corrected), rel(raw), rel(corrected), 0.5 * jnp.sum(d * d))
        return (d + updates, tx_state, opt_state), out

    init = (offset, tx.init(offset), opt.init(offset))
    _, out = jax.lax.scan(step, init, jax.random.split(k_data, STEPS))
    return out


def simulate(noise, *, rho, lr=0.002, scale0=2.0, seed=0):
    return [np.asarray(x) for x in _simulate(seed, noise, lr, rho, scale0)]


def first_step_below(losses, threshold):
    hits = np.nonzero(losses <= threshold)[0]
    return int(hits[0]) if hits.size else len(losses)


def closer_than_raw(run, *, cos_gain=0.15, rel_ratio=0.75):
    """Mean over steps >= MEASURE_FROM: the corrected gradient is clearly closer to g."""
    cos_raw, cos_corr, rel_raw, rel_corr, _ = (x[MEASURE_FROM:].mean() for x in run)
    return cos_corr >= cos_raw + cos_gain and rel_corr <= rel_ratio * rel_raw


@pytest.fixture(scope="module")
def common_runs():
    return {rho: simulate("common", rho=rho) for rho in (None, 0.5, 0.0)}


def test_corrected_gradient_is_closer_to_the_true_gradient(common_runs):
    run = common_runs[0.5]
    cos_raw, cos_corr, rel_raw, rel_corr, _ = (x[MEASURE_FROM:].mean() for x in run)
    # Measured (seed 0): cos 0.48 -> 0.76, relative error 1.95 -> 1.02.
    assert cos_corr >= cos_raw + 0.15, (cos_raw, cos_corr)
    assert rel_corr <= 0.75 * rel_raw, (rel_raw, rel_corr)
    assert closer_than_raw(run)
    # Before the warm-up ends the update is the raw gradient, exactly.
    # (metrics of the same array computed in two fusions: equal up to rounding)
    np.testing.assert_allclose(run[1][:WARMUP], run[0][:WARMUP], rtol=1e-5)
    # Negative control: with rho=0 GC-W is the identity and the assertion fails.
    off = common_runs[0.0]
    np.testing.assert_allclose(off[1], off[0], rtol=1e-5)
    assert not closer_than_raw(off)


LR_GRID = (0.002, 0.008, 0.032, 0.128)  # 0.002 first: defines the threshold
TUNE_SEEDS = (1, 2)  # disjoint from the reported seed 0


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _simulate_lrs(seeds, noise: str, rho: float | None, scale0: float):
    """Loss curves for every (lr in LR_GRID, seed): the lr is traced, one compilation."""
    lrs, ss = jnp.meshgrid(jnp.asarray(LR_GRID), seeds, indexing="ij")

    def one(lr, seed):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        offset = scale0 * jax.random.normal(k_init, (N_IN, N_OUT))
        offset = offset - offset.mean(-1, keepdims=True)
        tx = optax.identity() if rho is None else gc_w(rho=rho, warmup=WARMUP)
        opt = optax.adam(lr)

        def step(carry, key):
            d, tx_state, opt_state = carry
            k1, k2 = jax.random.split(key)
            eps = 2.0 * jax.random.normal(k1, (N_IN, 1)) + 0.5 * jax.random.normal(
                k2, (N_IN, N_OUT)
            )
            corrected, tx_state = tx.update(d + eps, tx_state)
            updates, opt_state = opt.update(corrected, opt_state)
            return (d + updates, tx_state, opt_state), 0.5 * jnp.sum(d * d)

        init = (offset, tx.init(offset), opt.init(offset))
        return jax.lax.scan(step, init, jax.random.split(k_data, STEPS))[1]

    return jax.vmap(jax.vmap(one))(lrs, ss)


def _steps_to(losses, thresholds):
    """Per (lr, seed) run: first step at which the loss is <= its seed's threshold."""
    losses = np.asarray(losses)
    return np.asarray(
        [[first_step_below(run, th) for run, th in zip(row, thresholds)] for row in losses]
    )


def _tuned_steps(rho):
    """Tune the lr on TUNE_SEEDS by the steps to the threshold, report seed 0.

    Threshold per seed: the untuned baseline's level (lr 0.002, mean of its
    last 100 steps), as in the test above."""
    out = {}
    for seeds in (TUNE_SEEDS, (0,)):
        base = np.asarray(_simulate_lrs(jnp.asarray(seeds), "common", None, 2.0))
        thresholds = base[0, :, -100:].mean(axis=1)
        losses = base if rho is None else _simulate_lrs(jnp.asarray(seeds), "common", rho, 2.0)
        out[seeds] = _steps_to(losses, thresholds).mean(axis=1)
    best = int(np.argmin(out[TUNE_SEEDS]))
    return LR_GRID[best], int(out[(0,)][best])


def test_v1_speedup_disappears_against_a_tuned_baseline(common_runs):
    """The measurement the issue called out. At the same Adam lr (0.002) GC-W v1
    reaches the baseline's final loss in ~15% fewer steps (first assertion), but
    0.002 is far from the baseline's best lr. Tuning every lr on LR_GRID on
    separate seeds (1, 2) by the steps to the same threshold (per seed, the lr
    0.002 baseline's level) and reporting seed 0: the tuned baseline (lr 0.128,
    measured: ~20 steps) needs a small fraction of the steps v1 needs at lr
    0.002 (1232), and tuned v1 (the same lr: the threshold is reached before
    its warm-up ends) is no faster than the tuned baseline. So the earlier
    "13-15% fewer steps" of this regime came from an under-tuned baseline."""
    base_loss = common_runs[None][4]
    threshold = base_loss[-100:].mean()
    gcw_untuned = first_step_below(common_runs[0.5][4], threshold)
    assert gcw_untuned <= 0.92 * first_step_below(base_loss, threshold)
    tuned = {"baseline": _tuned_steps(None), "gc_w": _tuned_steps(0.5)}
    base_steps, gcw_steps = tuned["baseline"][1], tuned["gc_w"][1]
    assert base_steps <= 0.25 * gcw_untuned, (tuned, gcw_untuned)
    assert gcw_steps >= 0.9 * base_steps, tuned


def test_isotropic_noise_at_the_noise_floor_does_not_hurt_much():
    """Control where there is little to learn: Adam with lr 0.01 reaches the
    noise floor within ~300 steps; afterwards the true gradient is the noise the
    weights absorbed, future gradients also reflect the optimizer's own steps,
    and the history is no better than the current gradient. Tolerance: the
    mean loss over the last 500 steps stays within 30% of the baseline's
    (measured: +12%), and the direction is not worse by more than 0.05 in cosine.
    """
    base = simulate("isotropic", rho=None, lr=0.01, scale0=1.0)
    gcw = simulate("isotropic", rho=0.5, lr=0.01, scale0=1.0)
    base_final, gcw_final = base[4][-500:].mean(), gcw[4][-500:].mean()
    assert gcw_final <= 1.3 * base_final, (base_final, gcw_final)
    assert gcw[1][MEASURE_FROM:].mean() >= gcw[0][MEASURE_FROM:].mean() - 0.05


def test_isotropic_noise_far_from_the_optimum_learns_too():
    """Without structure across units the history route still works (it does
    not depend on that structure): the correction helps, it does not hurt."""
    base = simulate("isotropic", rho=None)
    gcw = simulate("isotropic", rho=0.5)
    assert closer_than_raw(gcw)
    threshold = base[4][-100:].mean()
    assert first_step_below(gcw[4], threshold) <= first_step_below(base[4], threshold)


# --------------------------------------------------------------------------- GC-W v2
#
# Open-loop streams with a known optimal linear filter: the gradient stream does
# not depend on the correction, so "closer to the true gradient" compares the
# filters alone. A (16, 32) kernel, true gradient mu_t a slow random walk:
#
# * "drift": G_t = mu_t + 2 eta_t (i.i.d. noise). The optimal causal linear
#   filter is the steady-state Kalman filter, an EMA;
# * "anticorrelated": G_t = mu_t + 2 (eta_t - 0.9 eta_{t-1}): lag-1 correlation
#   -0.50; averaging over time (and a negative weight on G_t - G_{t-1}) cancels it.
#
# The reference optimum is a 40-tap Wiener filter fitted by least squares on a
# *separate* stream (seed 1) with mu known, applied to the test stream (seed 0).
# v2 runs at rho = 2 (its filter needs room: the issue asks for rho >= 1 to be
# allowed), v1 at its defaults with the same stream.

from gcgd_jax.transforms.gc_w_v2 import gc_w_v2

STREAM_STEPS, STREAM_FROM, TAPS = 1500, 300, 40


def _stream(kind, seed):
    k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
    drift = 0.05 if kind == "drift" else 0.02
    mu = jax.random.normal(k0, (N_IN, N_OUT)) + jnp.cumsum(
        drift * jax.random.normal(k1, (STREAM_STEPS, N_IN, N_OUT)), axis=0
    )
    eta = 2.0 * jax.random.normal(k2, (STREAM_STEPS + 1, N_IN, N_OUT))
    g = mu + eta[1:] if kind == "drift" else mu + eta[1:] - 0.9 * eta[:-1]
    return mu, g


def _mean_cos(a, mu):
    c = jnp.sum(a * mu, axis=(1, 2)) / (
        jnp.linalg.norm(a, axis=(1, 2)) * jnp.linalg.norm(mu, axis=(1, 2))
    )
    return float(c[STREAM_FROM:].mean())


def _lags(g):
    return jnp.stack([jnp.roll(g, lag, axis=0) for lag in range(TAPS)], axis=-1)


@jax.jit
def _wiener(g, mu):
    x = _lags(g)[TAPS:].reshape(-1, TAPS)
    y = mu[TAPS:].reshape(-1)
    return jnp.linalg.solve(x.T @ x, x.T @ y)


@functools.partial(jax.jit, static_argnums=(2,))
def _filtered(g, rho, version):
    tx = gc_w_v2(rho=rho) if version == 2 else gc_w(warmup=100)
    body = lambda s, x: tx.update(x, s)[::-1]
    return jax.lax.scan(body, tx.init(g[0]), g)[1]


@pytest.fixture(scope="module", params=["drift", "anticorrelated"])
def stream_cosines(request):
    mu, g = _stream(request.param, 0)
    c = _wiener(*_stream(request.param, 1)[::-1])
    optimal = (_lags(g) @ c).at[:TAPS].set(g[:TAPS])
    return request.param, {
        "raw": _mean_cos(g, mu),
        "optimal": _mean_cos(optimal, mu),
        "v1": _mean_cos(_filtered(g, 0.5, 1), mu),
        "v2": _mean_cos(_filtered(g, 2.0, 2), mu),
        "v2_rho0": _mean_cos(_filtered(g, 0.0, 2), mu),
    }


def test_v2_is_closer_to_the_true_gradient_than_raw_and_v1(stream_cosines):
    """Measured (seed 0), mean cos to mu over steps >= 300:
    drift: raw 0.635, v1 0.871, v2 0.940, optimal 0.975;
    anticorrelated: raw 0.386, v1 0.706, v2 0.832, optimal 0.997.
    Margins: v2 >= raw + 0.25, v2 >= v1 + 0.04, and v2 gets >= 60% of the
    optimal filter's gain over raw."""
    kind, c = stream_cosines
    assert c["v2"] >= c["raw"] + 0.25, (kind, c)
    assert c["v2"] >= c["v1"] + 0.04, (kind, c)
    assert c["v2"] - c["raw"] >= 0.6 * (c["optimal"] - c["raw"]), (kind, c)
    assert c["optimal"] >= c["v2"]  # the reference is a real upper bound here


def test_v2_negative_control_rho_zero_is_the_raw_gradient(stream_cosines):
    _kind, c = stream_cosines
    np.testing.assert_allclose(c["v2_rho0"], c["raw"], rtol=1e-6)
    assert not c["v2_rho0"] >= c["raw"] + 0.25
