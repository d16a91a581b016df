"""Evidence that GC-W learns, on a stochastic problem whose true gradient is known.

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
``experiments/gc_w_study.py`` runs the same study over more seeds and regimes.

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


def test_reaches_the_loss_threshold_in_fewer_steps(common_runs):
    base_loss = common_runs[None][4]
    threshold = base_loss[-100:].mean()  # where the baseline is near the end of the run
    base_steps = first_step_below(base_loss, threshold)
    gcw_steps = first_step_below(common_runs[0.5][4], threshold)
    off_steps = first_step_below(common_runs[0.0][4], threshold)
    # Measured (seed 0): baseline 1449 steps, GC-W 1232 (15% fewer).
    assert gcw_steps <= 0.92 * base_steps, (base_steps, gcw_steps)
    assert off_steps == base_steps  # rho=0 is the baseline, step for step
    np.testing.assert_allclose(common_runs[0.0][4], base_loss, rtol=1e-6)


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
