"""GC-W v1 vs v2 vs the known corrections, every method with its learning rate tuned.

Controlled problems (one dense kernel W of shape (16, 32), known true gradient
g = W − W*, loss ½‖W − W*‖², Adam after the correction, start 2·N(0, 1) away,
centred over units, 1500 steps):

* ``nqm_isotropic``: minibatch gradient g + 2η (η standard normal, fresh
  every step);
* ``nqm_common``: g + 2ξ1ᵀ + 0.5η (noise shared across output units);
* ``nqm_anticorrelated``: g + 2(η_t − 0.9 η_{t−1}) (negative lag-1
  correlation: averaging over time cancels it, a difference term helps);
* ``regression``: multi-output linear regression with real minibatches
  (B = 8, x ~ N(0, I), label noise 3ξ1 + 0.3η); its population gradient is
  W − W*.

Methods (registry names): ``baseline`` (Adam alone), ``gc_w`` (v1, ``gc_w()`` defaults),
``gc_w_v2`` (``gc_w_v2(rho=ρ)``, ρ chosen below), ``mars_correction`` and
``grokfast_ema`` (paper defaults), each chained before ``optax.adam(lr)``.

Protocol (honest tuning):

1. *Tuning seeds* (``--tune-seeds``, disjoint from the report seeds): every
   method runs on the whole learning-rate grid ``LRS``. Two learning rates
   are chosen per method and problem: ``lr_speed`` minimises the mean number
   of steps to reach the threshold (1% of the initial loss of the seed),
   ``lr_final`` minimises the mean final loss (mean over the last 20% of
   steps). GC-W v2's ρ is chosen once, over all problems, from ``RHOS``: the
   one with the lowest mean over problems of (steps at its lr_speed) /
   (baseline's steps at its lr_speed).
2. *Report seeds* (``--seeds``, fresh): every method at its chosen learning
   rates; paired per seed against the baseline (same start, same noise
   stream): steps to the threshold (at lr_speed), final loss (at lr_final),
   cosine of the corrected gradient with the true gradient (mean over steps
   ≥ 100, at lr_speed). Intervals: Student-t 95% over seeds of the paired
   differences (log-ratio for the final loss).
3. *What v2 learned*: at the end of every report run, the least-squares
   linear filter that reproduces its bounded offset over the coordinates
   (``gc_w_v2_effective_filter``), as coefficients on its tokens
   ``[G, m_0.5, m_0.9, m_0.99, G − G_prev]`` and as the impulse response of
   Ĝ = G + ΔG over the lags of G (``h[0..5]``, EMAs unrolled).

Separately (``--resnet-only --rho ρ``) short ResNet-20 runs on a Fashion-MNIST
subset (see :func:`resnet_study`), written to ``resnet20.json``/``.md``.

Writes ``results.json``, ``results.md``, ``curves.png`` (controlled part) in
``experiments/results/gc_w_study/``. Usage::

    python -m experiments.studies.gc_w_study [--seeds 5] [--tune-seeds 3]
    python -m experiments.studies.gc_w_study --resnet-only --rho 1 [--resnet-seeds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the library's CPU XLA flag, before JAX starts
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common.provenance import describe_machine, machine
from experiments.suites.stats import t_mean_ci
from gcgd_jax import methods as registry
from gcgd_jax.transforms.gc_w_v2 import gc_w_v2_effective_filter

N_IN, N_OUT, BATCH = 16, 32, 8
STEPS = 1500
COS_FROM = 100
THRESHOLD = 0.01  # fraction of the seed's initial loss
LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)
RHOS = (0.5, 1.0, 2.0)
PROBLEMS = ("nqm_isotropic", "nqm_common", "nqm_anticorrelated", "regression")
DECAYS = (0.5, 0.9, 0.99)  # gc_w_v2's defaults (the effective-filter unrolling uses them)
OUT = Path("experiments/results/gc_w_study")


# Registry names (``gcgd_jax.methods``): ``gc_w`` is GC-W v1. Result files written before
# the study used the registry's names label it ``gc_w_v1``.
METHODS = ("baseline", "gc_w", "gc_w_v2", "mars_correction", "grokfast_ema")
STUDY_OPTIONS = {"gc_w_v2": {"decays": DECAYS}}  # besides ρ; everything else at defaults


def make_tx(method: str, rho: float = 1.0, **options) -> optax.GradientTransformation:
    """The method's registered factory at its defaults (plus ``options``; ρ for v2)."""
    if method == "baseline":
        return optax.identity()
    entry = registry.get(method)
    kwargs = {**entry.fixed, **STUDY_OPTIONS.get(method, {}), **options}
    if method == "gc_w_v2":
        kwargs["rho"] = rho
    return entry.load()(**kwargs)


def simulate(problem: str, method: str, lrs, seeds, *, rho: float = 1.0, steps: int = STEPS):
    """Per (lr, seed): cos(corrected, true) and loss per step; v2's final predictor/features."""
    tx = make_tx(method, rho)

    def one(lr, seed):
        opt = optax.adam(lr)
        k_init, k_star, k_data = jax.random.split(jax.random.key(seed), 3)
        d0 = 2.0 * jax.random.normal(k_init, (N_IN, N_OUT))
        d0 = d0 - d0.mean(-1, keepdims=True)
        w_star = jax.random.normal(k_star, (N_IN, N_OUT))

        def step(carry, key):
            d, tx_state, opt_state, eta_prev = carry
            k1, k2, k3 = jax.random.split(key, 3)
            eta = jax.random.normal(k2, (N_IN, N_OUT))
            if problem == "nqm_isotropic":
                raw = d + 2.0 * eta
            elif problem == "nqm_common":
                raw = d + 2.0 * jax.random.normal(k1, (N_IN, 1)) + 0.5 * eta
            elif problem == "nqm_anticorrelated":
                raw = d + 2.0 * (eta - 0.9 * eta_prev)
            else:  # regression
                x = jax.random.normal(k1, (BATCH, N_IN))
                y = (
                    x @ w_star
                    + 3.0 * jax.random.normal(k3, (BATCH, 1))
                    + 0.3 * jax.random.normal(k2, (BATCH, N_OUT))
                )
                raw = x.T @ (x @ (w_star + d) - y) / BATCH
            corrected, tx_state = tx.update(raw, tx_state)
            updates, opt_state = opt.update(corrected, opt_state)
            cos = jnp.sum(corrected * d) / (jnp.linalg.norm(corrected) * jnp.linalg.norm(d))
            return (d + updates, tx_state, opt_state, eta), (cos, 0.5 * jnp.sum(d * d))

        init = (d0, tx.init(d0), opt.init(d0), jnp.zeros((N_IN, N_OUT)))
        (_, tx_state, _, _), (cos, loss) = jax.lax.scan(step, init, jax.random.split(k_data, steps))
        extra = ()
        if method == "gc_w_v2":
            last = (steps - 1) % tx_state.stored.shape[0]
            c, r2 = gc_w_v2_effective_filter(tx_state.predictor, tx_state.stored[last], rho)
            extra = (c, r2)
        return cos, loss, extra

    lr_grid, seed_grid = np.meshgrid(np.asarray(lrs, np.float32), np.asarray(seeds), indexing="ij")
    out = jax.jit(jax.vmap(jax.vmap(one)))(jnp.asarray(lr_grid), jnp.asarray(seed_grid))
    return jax.tree.map(np.asarray, out)


def steps_to(loss: np.ndarray) -> np.ndarray:
    """First step with loss <= THRESHOLD x initial loss (len = not reached), per run."""
    thr = THRESHOLD * loss[..., :1]
    hit = loss <= thr
    first = np.argmax(hit, axis=-1)
    return np.where(hit.any(axis=-1), first, loss.shape[-1])


def final_loss(loss: np.ndarray) -> np.ndarray:
    return loss[..., -max(1, loss.shape[-1] // 5) :].mean(axis=-1)


def impulse_response(c: np.ndarray, decays=DECAYS, lags: int = 6) -> list[float]:
    """Ĝ = G + Σ c_j x_j as weights on G_t, G_{t-1}, ... (EMAs unrolled; scale-free)."""
    h = np.zeros(lags)
    h[0] = 1.0 + c[0] + c[-1]
    h[1] -= c[-1]
    for j, b in enumerate(decays):
        h += c[1 + j] * (1.0 - b) * b ** np.arange(lags)
    return h.tolist()


def _ci(values) -> dict:
    mean, low, high = t_mean_ci(list(map(float, values)))
    return {"mean": mean, "low": low, "high": high}


def controlled_study(seeds, tune_seeds, log):
    tuning, chosen, report, filters = {}, {}, {}, {}
    # 1. tuning
    for problem in PROBLEMS:
        for method in METHODS:
            variants = RHOS if method == "gc_w_v2" else (None,)
            for rho in variants:
                name = method if rho is None else f"gc_w_v2_rho{rho:g}"
                t0 = time.time()
                cos, loss, _ = simulate(problem, method, LRS, tune_seeds, rho=rho or 1.0)
                st, fl = steps_to(loss).mean(axis=1), final_loss(loss).mean(axis=1)
                tuning[(problem, name)] = {"steps": st.tolist(), "final": fl.tolist()}
                log(
                    f"tune {problem} {name}: steps {np.round(st).astype(int).tolist()} "
                    f"final {np.round(fl, 2).tolist()} ({time.time() - t0:.0f} s)"
                )
    # rho: mean over problems of its best steps / the baseline's best steps
    rho_score = {}
    for rho in RHOS:
        ratios = [
            min(tuning[(p, f"gc_w_v2_rho{rho:g}")]["steps"]) / min(tuning[(p, "baseline")]["steps"])
            for p in PROBLEMS
        ]
        rho_score[rho] = float(np.mean(ratios))
    rho_star = min(RHOS, key=lambda r: (rho_score[r], r))
    log(f"rho scores {rho_score} -> rho = {rho_star}")
    for problem in PROBLEMS:
        for method in METHODS:
            key = f"gc_w_v2_rho{rho_star:g}" if method == "gc_w_v2" else method
            t = tuning[(problem, key)]
            # ties: the smaller lr (lexicographic on the criterion, then lr)
            i_speed = min(range(len(LRS)), key=lambda i: (t["steps"][i], t["final"][i]))
            i_final = min(range(len(LRS)), key=lambda i: t["final"][i])
            chosen[(problem, method)] = {"lr_speed": LRS[i_speed], "lr_final": LRS[i_final]}
    # 2. report seeds
    curves = {}
    for problem in PROBLEMS:
        runs = {}
        for method in METHODS:
            c = chosen[(problem, method)]
            lrs = (c["lr_speed"], c["lr_final"])
            t0 = time.time()
            cos, loss, extra = simulate(problem, method, lrs, seeds, rho=rho_star)
            runs[method] = (cos, loss)
            curves[(problem, method)] = (np.median(loss[0], axis=0), np.median(cos[0], axis=0))
            if method == "gc_w_v2":
                coef, r2 = extra
                filters[problem] = {
                    "coefficients_mean": coef[0].mean(axis=0).tolist(),
                    "coefficients_per_seed": coef[0].tolist(),
                    "linear_fit_r2_mean": float(r2[0].mean()),
                    "impulse_response_mean": impulse_response(coef[0].mean(axis=0)),
                }
            log(f"report {problem} {method} ({time.time() - t0:.0f} s)")
        base_cos, base_loss = runs["baseline"]
        base_steps = steps_to(base_loss[0])
        base_final = final_loss(base_loss[1])
        for method in METHODS:
            cos, loss = runs[method]
            st, fl = steps_to(loss[0]), final_loss(loss[1])
            report[(problem, method)] = {
                **chosen[(problem, method)],
                "steps_per_seed": st.tolist(),
                "steps_not_reached": int((st >= STEPS).sum()),
                "final_loss_per_seed": fl.tolist(),
                "cos_true_mean": float(cos[0][:, COS_FROM:].mean()),
                "cos_true_per_seed": cos[0][:, COS_FROM:].mean(axis=1).tolist(),
                "paired_vs_baseline": {
                    "steps_diff": _ci(st - base_steps),
                    "steps_ratio_mean": float(np.mean(st / base_steps)),
                    "log_final_ratio": _ci(np.log(fl / base_final)),
                    "cos_diff": _ci(
                        cos[0][:, COS_FROM:].mean(axis=1) - base_cos[0][:, COS_FROM:].mean(axis=1)
                    ),
                },
            }
    return {
        "tuning": {f"{p}|{m}": v for (p, m), v in tuning.items()},
        "rho_scores": {str(k): v for k, v in rho_score.items()},
        "rho": rho_star,
        "report": {f"{p}|{m}": v for (p, m), v in report.items()},
        "v2_effective_filter": filters,
    }, curves


# ----------------------------------------------------------------------------- ResNet-20


def resnet_study(seeds, tune_seeds, lrs, steps, log, batch=128, subset=4096):
    """Short ResNet-20 runs on a Fashion-MNIST subset (SGD-momentum 0.9, constant lr).

    Same protocol as the controlled problems: lr tuned per method on
    ``tune_seeds`` by the final training loss (mean over the last 20% of
    steps), then ``seeds`` paired at the chosen lr: final training loss, test
    accuracy on 2,000 held-out images, and steps to reach the baseline's
    mean final loss on the tuning seeds. GC-W v1/v2 on the 3
    pre-down-sampling kernels; MARS and Grokfast on every parameter
    (their papers' use). v1 runs with the comparison suites' short-run
    settings (``warmup=24, window=4``): its default warm-up (100) exceeds a
    96-step run.
    """
    from flax import nnx

    from gcgd_jax.models import pre_downsampling_mask, resnet20
    from gcgd_jax.train import load_config, load_data

    cfg = load_config("cpu_fmnist", [])
    train_ds, test_ds = load_data(cfg)
    x_all, y_all = np.asarray(train_ds.images), np.asarray(train_ds.labels)
    x_test, y_test = np.asarray(test_ds.images)[:2000], np.asarray(test_ds.labels)[:2000]
    mean, std = x_all[:subset].mean(), x_all[:subset].std()
    prep = lambda x: (np.asarray(x, np.float32) - mean) / std

    model0 = resnet20(num_classes=10, in_channels=x_all.shape[-1], rngs=nnx.Rngs(0))
    graphdef, _, _ = nnx.split(model0, nnx.Param, ...)
    mask = pre_downsampling_mask(model0)
    compiled = {}

    def make_tx_for(method, rho, key=0):
        if method == "gc_w":  # v1 at the suites' short-run settings (its warm-up is 100)
            corr = optax.masked(make_tx(method, warmup=24, window=4, key=key), mask)
        elif method == "gc_w_v2":
            corr = optax.masked(make_tx(method, rho, key=key), mask)
        else:
            corr = make_tx(method)
        return optax.chain(corr, optax.trace(decay=0.9))

    def make(method, rho):
        """One compiled train step per method: the lr is an argument (SGD momentum 0.9 =
        trace(0.9) then scale(-lr)), so lrs and seeds share the compilation (the
        predictor's seed only enters its init)."""
        tx = make_tx_for(method, rho)

        def loss_fn(p, r, x, y):
            m = nnx.merge(graphdef, p, r, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        @jax.jit
        def step(p, r, o, x, y, lr):
            (loss, r), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r, x, y)
            u, o = tx.update(g, o, p)
            u = jax.tree.map(lambda v: -lr * v, u)
            return optax.apply_updates(p, u), r, o, loss

        @jax.jit
        def evaluate(p, r, x):
            m = nnx.merge(graphdef, p, r, copy=True)
            m.eval()
            return jnp.argmax(m(x), -1)

        return tx, step, evaluate

    def run(method, lr, seed, rho):
        if method not in compiled:
            compiled[method] = make(method, rho)
        _tx, step, evaluate = compiled[method]
        model = resnet20(num_classes=10, in_channels=x_all.shape[-1], rngs=nnx.Rngs(seed))
        model.train()
        _, params, rest = nnx.split(model, nnx.Param, ...)
        opt_state = make_tx_for(method, rho, key=seed).init(params)
        rng = np.random.default_rng(seed)
        order = np.concatenate(
            [rng.permutation(subset) for _ in range(steps * batch // subset + 1)]
        )
        losses = []
        for t in range(steps):
            idx = order[t * batch : (t + 1) * batch]
            params, rest, opt_state, loss = step(
                params, rest, opt_state, prep(x_all[idx]), y_all[idx], jnp.float32(lr)
            )
            losses.append(float(loss))
        preds = np.concatenate(
            [
                np.asarray(evaluate(params, rest, prep(x_test[i : i + 500])))
                for i in range(0, len(x_test), 500)
            ]
        )
        return np.asarray(losses), float((preds == y_test).mean())

    tuning, chosen, report = {}, {}, {}
    for method in METHODS:
        finals = []
        for lr in lrs:
            f = []
            for s in tune_seeds:
                t0 = time.time()
                losses, _ = run(method, lr, s, RESNET_RHO[0])
                f.append(float(final_loss(losses)))
                log(
                    f"resnet tune {method} lr {lr} seed {s}: final {f[-1]:.3f} ({time.time() - t0:.0f} s)"
                )
            finals.append(float(np.mean(f)))
        tuning[method] = finals
        chosen[method] = lrs[int(np.argmin(finals))]
    threshold = min(tuning["baseline"])
    runs = {}
    for method in METHODS:
        runs[method] = [run(method, chosen[method], s, RESNET_RHO[0]) for s in seeds]
        log(f"resnet report {method} lr {chosen[method]}")
    first_below = lambda c: int(np.argmax(c <= threshold)) if (c <= threshold).any() else len(c)
    for method in METHODS:
        fl = np.asarray([final_loss(c) for c, _ in runs[method]])
        acc = np.asarray([a for _, a in runs[method]])
        st = np.asarray([first_below(_smooth(c, 8)) for c, _ in runs[method]])
        bfl = np.asarray([final_loss(c) for c, _ in runs["baseline"]])
        bacc = np.asarray([a for _, a in runs["baseline"]])
        bst = np.asarray([first_below(_smooth(c, 8)) for c, _ in runs["baseline"]])
        report[method] = {
            "lr": chosen[method],
            "final_loss_per_seed": fl.tolist(),
            "test_acc_per_seed": acc.tolist(),
            "steps_to_threshold_per_seed": st.tolist(),
            "paired_vs_baseline": {
                "log_final_ratio": _ci(np.log(fl / bfl)),
                "acc_diff_pp": _ci(100 * (acc - bacc)),
                "steps_diff": _ci(st - bst),
            },
        }
    return {
        "settings": {
            "lrs": list(lrs),
            "steps": steps,
            "batch": batch,
            "subset": subset,
            "tune_seeds": list(tune_seeds),
            "seeds": list(seeds),
            "rho": RESNET_RHO[0],
            "threshold_smoothed_loss": threshold,
        },
        "tuning_final_loss": tuning,
        "report": report,
    }


RESNET_RHO = [1.0]  # set to the controlled study's rho before the ResNet runs


def _smooth(x, width=25):
    width = min(width, len(x))
    return np.convolve(x, np.ones(width) / width, mode="valid")


def _fmt_ci(ci, digits=0, scale=1.0):
    f = f"{{:+.{digits}f}}"
    return f"{f.format(scale * ci['mean'])} [{f.format(scale * ci['low'])}, {f.format(scale * ci['high'])}]"


def markdown(meta, res, resnet) -> str:
    if res is None:
        return _resnet_section(resnet)
    return _controlled_section(meta, res) + ("" if resnet is None else _resnet_section(resnet))


def _controlled_section(meta, res) -> str:
    lines = [
        "# GC-W study: v1, v2, MARS-approx, Grokfast-EMA and the optimizer alone",
        "",
        (
            f"Command: `{meta['command']}`; machine: {meta['machine']}; date: {meta['date']}; "
            f"{meta['elapsed_s']:.0f} s."
        ),
        "",
        "Protocol: docstring of `experiments/studies/gc_w_study.py`. Every method's Adam learning rate "
        f"is tuned on the grid {list(LRS)} on tuning seeds {meta['tune_seeds']}, then "
        f"reported on fresh seeds {meta['seeds']}, paired with the baseline (same start and "
        f"noise). Threshold: {THRESHOLD:.0%} of the initial loss; {STEPS} steps (= not reached). "
        f"GC-W v2's ρ chosen on the tuning seeds from {list(RHOS)}: **ρ = {res['rho']:g}** "
        f"(score = mean over problems of its best steps / the baseline's best: "
        + ", ".join(f"ρ {k}: {v:.3f}" for k, v in res["rho_scores"].items())
        + "). Intervals: Student-t 95% over seeds of the paired differences.",
        "",
        (
            "| problem | method | lr speed / final | steps (per seed) | Δ steps vs base [95% CI] "
            "| final loss (mean) | final / base [95% CI] | cos(Ĝ, g) | Δ cos [95% CI] |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in res["report"].items():
        p, m = key.split("|")
        pv = r["paired_vs_baseline"]
        ratio = {k: float(np.exp(v)) for k, v in pv["log_final_ratio"].items()}
        lines.append(
            f"| {p} | {m} | {r['lr_speed']:g} / {r['lr_final']:g} | {r['steps_per_seed']} | "
            f"{_fmt_ci(pv['steps_diff'])} | {np.mean(r['final_loss_per_seed']):.3g} | "
            f"{ratio['mean']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}] | "
            f"{r['cos_true_mean']:.3f} | {_fmt_ci(pv['cos_diff'], 3)} |"
        )
    lines += [
        "",
        (
            "`final / base` is the geometric mean of the per-seed ratios (at each method's "
            "lr_final); steps and cosines are at lr_speed."
        ),
        "",
        "## What v2 learned (effective linear filter at the end of the report runs)",
        "",
        (
            "Least-squares coefficients c with ΔG ≈ Σ c_j x_j over the coordinates "
            "(tokens G, m_0.5, m_0.9, m_0.99, G − G_prev), mean over seeds; R² of that linear fit; "
            "and Ĝ's weights on G_t, G_{t−1}, … (EMAs unrolled, in units where ‖ΔG‖ is at the "
            "bound)."
        ),
        "",
        "| problem | c (G, m.5, m.9, m.99, ΔG) | R² | Ĝ weights on G_t … G_{t−5} |",
        "| --- | --- | --- | --- |",
    ]
    for p, f in res["v2_effective_filter"].items():
        lines.append(
            f"| {p} | {', '.join(f'{x:+.2f}' for x in f['coefficients_mean'])} | "
            f"{f['linear_fit_r2_mean']:.3f} | "
            f"{', '.join(f'{x:.3f}' for x in f['impulse_response_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def _resnet_section(resnet) -> str:
    if True:
        s = resnet["settings"]
        lines = [
            "",
            "## ResNet-20, short runs (Fashion-MNIST subset)",
            "",
            (
                f"{s['steps']} steps, batch {s['batch']}, {s['subset']}-image training subset, "
                f"SGD momentum 0.9 at a constant lr tuned on {s['lrs']} (tuning seeds "
                f"{s['tune_seeds']}, by final training loss), report seeds {s['seeds']}; GC-W on the 3 "
                f"pre-down-sampling kernels (v1 with warmup 24, window 4; v2 with ρ = {s['rho']:g}); "
                "MARS/Grokfast on every "
                "parameter. Threshold for steps: the best mean final loss of the baseline on the "
                f"tuning seeds ({s['threshold_smoothed_loss']:.3f}), on an 8-step moving mean "
                f"({s['steps'] - 7} = not reached)."
            ),
            "",
            (
                "| method | lr | final train loss / base [95% CI] | test acc (mean) | Δ acc pp [95% CI] "
                "| steps to threshold | Δ steps [95% CI] |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m, r in resnet["report"].items():
            pv = r["paired_vs_baseline"]
            ratio = {k: float(np.exp(v)) for k, v in pv["log_final_ratio"].items()}
            lines.append(
                f"| {m} | {r['lr']:g} | {ratio['mean']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}] | "
                f"{100 * np.mean(r['test_acc_per_seed']):.2f}% | {_fmt_ci(pv['acc_diff_pp'], 2)} | "
                f"{r['steps_to_threshold_per_seed']} | {_fmt_ci(pv['steps_diff'])} |"
            )
    return "\n".join(lines) + "\n"


def plot(curves, res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(PROBLEMS), figsize=(4.2 * len(PROBLEMS), 8.4))
    for j, problem in enumerate(PROBLEMS):
        ax_loss, ax_cos, ax_lr = axes[0, j], axes[1, j], axes[2, j]
        for k, method in enumerate(METHODS):
            loss, cos = curves[(problem, method)]
            color = "k" if method == "baseline" else f"C{k}"
            lr = res["report"][f"{problem}|{method}"]["lr_speed"]
            ax_loss.plot(loss, lw=1, color=color, label=f"{method} (lr {lr:g})")
            ax_cos.plot(_smooth(cos), lw=1, color=color, label=method)
            key = f"gc_w_v2_rho{res['rho']:g}" if method == "gc_w_v2" else method
            ax_lr.plot(
                LRS,
                res["tuning"][f"{problem}|{key}"]["steps"],
                "o-",
                ms=3,
                lw=1,
                color=color,
                label=method,
            )
        ax_loss.set_yscale("log")
        ax_loss.set_title(f"{problem}: loss (median, report seeds)", fontsize=8)
        ax_cos.set_title(f"{problem}: cos(Ĝ, true g), moving mean 25", fontsize=8)
        ax_lr.set_xscale("log")
        ax_lr.set_title(f"{problem}: steps to threshold vs lr (tuning seeds)", fontsize=8)
        for ax in (ax_loss, ax_cos, ax_lr):
            ax.tick_params(labelsize=7)
        ax_loss.legend(fontsize=5.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _resnet_markdown(meta, resnet) -> str:
    head = [
        "# GC-W study, part 2: ResNet-20 short runs",
        "",
        (
            f"Command: `{meta['command']}`; machine: {meta['machine']}; date: {meta['date']}; "
            f"{meta['elapsed_s']:.0f} s."
        ),
        "",
    ]
    return (
        "\n".join(head)
        + _resnet_section(resnet).split("## ResNet-20, short runs (Fashion-MNIST subset)\n", 1)[1]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="report seeds 0..S-1")
    parser.add_argument("--tune-seeds", type=int, default=3, help="tuning seeds 100..100+S-1")
    parser.add_argument(
        "--resnet-only",
        action="store_true",
        help="only the short ResNet-20 runs (writes resnet20.json/.md; give --rho)",
    )
    parser.add_argument("--rho", type=float, default=None, help="v2's rho for --resnet-only")
    parser.add_argument("--resnet-steps", type=int, default=96)
    parser.add_argument("--resnet-seeds", type=int, default=3)
    parser.add_argument("--resnet-batch", type=int, default=128)
    parser.add_argument("--resnet-lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    tune_seeds = list(range(100, 100 + args.tune_seeds))
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)
    meta = {
        "command": "python "
        + " ".join(["experiments/studies/gc_w_study.py", *(argv or sys.argv[1:])]),
        "machine": f"{describe_machine(machine())} (shared), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resnet_only:
        if args.rho is None:
            parser.error("--resnet-only needs --rho (the controlled study's choice)")
        RESNET_RHO[0] = args.rho
        resnet = resnet_study(
            list(range(args.resnet_seeds)),
            [100],
            args.resnet_lrs,
            args.resnet_steps,
            log,
            batch=args.resnet_batch,
        )
        meta["elapsed_s"] = round(time.time() - start, 1)
        (args.out / "resnet20.json").write_text(
            json.dumps({"meta": meta, "resnet20": resnet}, indent=1) + "\n"
        )
        text = _resnet_markdown(meta, resnet)
        (args.out / "resnet20.md").write_text(text)
        print(text)
        return
    res, curves = controlled_study(seeds, tune_seeds, log)
    meta.update(
        {
            "seeds": seeds,
            "tune_seeds": tune_seeds,
            "steps": STEPS,
            "lrs": list(LRS),
            "rhos": list(RHOS),
            "threshold_fraction": THRESHOLD,
            "elapsed_s": round(time.time() - start, 1),
        }
    )
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "controlled": res}, indent=1) + "\n"
    )
    text = markdown(meta, res, None)
    (args.out / "results.md").write_text(text)
    plot(curves, res, args.out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
