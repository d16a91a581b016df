"""Does GC-W learn? A study on stochastic problems whose true gradient is known.

Parameter: one dense kernel W of shape (16, 32) (in, out). Problems:

* ``nqm_common``: noisy quadratic ½‖W − W*‖², gradient (W − W*) + ε with
  ε = 2 ξ 1ᵀ + 0.5 η (noise shared across output units plus a small
  independent part), fresh every step.
* ``nqm_isotropic``: the same with ε = 2 η (no structure across units).
* ``regression``: multi-output linear regression with real minibatches (B = 8,
  x ~ N(0, I)), targets y = W*ᵀx + 3 ξ 1 + 0.3 η (label noise shared across
  outputs). The population (true) gradient is E[x xᵀ](W − W*) = W − W*.

Regimes (optimizer after GC-W, learning rate, distance of the start):

* ``far/adam``: Adam lr 0.002, start 2·N(0,1) away (centred over units): the
  run stays far from the optimum, the true gradient changes slowly.
* ``floor/adam``: Adam lr 0.01, start 1·N(0,1) away: the noise floor is
  reached after ~300 steps.
* ``floor/sgd``: SGD lr 0.05 (0.02 for regression), start 1·N(0,1) away.

Methods: ``baseline`` (no GC-W), ``gc_w`` (defaults except warmup=200),
``gc_w_next`` (target="next_gradient"), ``gc_w_lr1e-3`` (predictor lr 1e-3),
``gc_w_attn_only`` (mixing scalars frozen at 0: attention path only — an
ablation through the module's internals). Seeds 0..S−1 (vmapped).

Metrics, from step 300 (after the warm-up): mean cosine of the raw and the
corrected gradient with the true gradient, relative errors ‖·−g‖/‖g‖, final
loss (mean of the last 20% of steps) and the steps each method needs to reach
the baseline's final loss (per seed; ``T`` = not reached).

Writes ``results.json``, ``results.md``, ``curves.png`` to
``experiments/results/gc_w_study/``. Usage:
``python experiments/gc_w_study.py [--seeds 3] [--steps 1500]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

gc_w_module = importlib.import_module("gcgd_jax.transforms.gc_w")
from gcgd_jax.transforms.gc_w import gc_w

N_IN, N_OUT, BATCH = 16, 32, 8
MEASURE_FROM = 300
OUT = Path("experiments/results/gc_w_study")

REGIMES = {
    "far/adam": {"opt": "adam", "lr": 0.002, "scale0": 2.0},
    "floor/adam": {"opt": "adam", "lr": 0.01, "scale0": 1.0},
    "floor/sgd": {"opt": "sgd", "lr": 0.05, "scale0": 1.0},
}
PROBLEMS = ("nqm_common", "nqm_isotropic", "regression")
METHODS = {
    "baseline": None,
    "gc_w": {"warmup": 200},
    "gc_w_next": {"warmup": 200, "target": "next_gradient"},
    "gc_w_lr1e-3": {"warmup": 200, "predictor_learning_rate": 1e-3},
    "gc_w_attn_only": {"warmup": 200},  # with the mixing scalars frozen, see _attn_only
}


NOTES = """## Reading (written for the committed run; re-check after changes)

* **far/adam** (true gradient changes slowly compared with the noise): GC-W learns.
  After the warm-up the corrected gradient is much closer to the true gradient
  than the raw one (cosine about 0.50 -> 0.76-0.78, relative error about 1.8 -> 0.9-1.0)
  on all three problems, and Adam reaches the baseline's final loss in about 13%
  fewer steps. `next_gradient` does about as well. The mixing scalars (a learned,
  bounded momentum) carry most of it: the attention-only ablation gains little
  (cos +0.02-0.06). Shared noise across units (nqm_common) is *not* what it
  exploits: the isotropic problem gains as much. With the predictor lr 1e-3 it
  learns too slowly to matter within 1500 steps.
* **floor/adam** (noise floor reached after ~300 steps): the direction is not
  improved (cosine 0.06-0.08 both ways; the relative error halves only because the
  correction shrinks the gradient) and the final loss is 15-36% *higher* than the
  baseline's: future gradients there reflect the optimizer's own steps, so the
  target is biased. The `steps` column is noisy here (the floor fluctuates).
* **floor/sgd**: the final loss is about half the baseline's, by learned shrinkage
  (a smaller effective step lowers SGD's noise floor), not a better direction
  (the cosine is lower). The `steps` column is meaningless here (the baseline
  touches its own mean floor within ~50 steps).
"""


class _attn_only:
    """Context manager: GC-W with a_G = a_M = 0 (attention path only)."""

    def __enter__(self):
        self.orig = gc_w_module._predict

        def predict(p, g, m, rho, num_heads, head_size):
            p = dict(p, mix=jax.lax.stop_gradient(p["mix"]) * 0.0)
            return self.orig(p, g, m, rho, num_heads, head_size)

        gc_w_module._predict = predict

    def __exit__(self, *exc):
        gc_w_module._predict = self.orig


def simulate(problem, regime, method_kwargs, seeds, steps):
    """Per-seed, per-step metrics: cos raw/corr, rel raw/corr, loss."""
    opt_name, lr, scale0 = regime["opt"], regime["lr"], regime["scale0"]
    if problem == "regression" and opt_name == "sgd":
        lr = 0.02  # SGD on minibatch regression is unstable-ish at 0.05
    opt = optax.adam(lr) if opt_name == "adam" else optax.sgd(lr)
    tx = optax.identity() if method_kwargs is None else gc_w(**method_kwargs)

    def one(seed):
        k_init, k_star, k_data = jax.random.split(jax.random.key(seed), 3)
        offset = scale0 * jax.random.normal(k_init, (N_IN, N_OUT))
        offset = offset - offset.mean(-1, keepdims=True)
        w_star = jax.random.normal(k_star, (N_IN, N_OUT))

        def raw_gradient(d, key):
            k1, k2 = jax.random.split(key)
            if problem == "nqm_common":
                return (
                    d
                    + 2.0 * jax.random.normal(k1, (N_IN, 1))
                    + 0.5 * jax.random.normal(k2, (N_IN, N_OUT))
                )
            if problem == "nqm_isotropic":
                return d + 2.0 * jax.random.normal(k2, (N_IN, N_OUT))
            k3, _ = jax.random.split(k1)
            x = jax.random.normal(k1, (BATCH, N_IN))
            y = (
                x @ w_star
                + 3.0 * jax.random.normal(k2, (BATCH, 1))
                + 0.3 * jax.random.normal(k3, (BATCH, N_OUT))
            )
            w = w_star + d
            return x.T @ (x @ w - y) / BATCH

        def step(carry, key):
            d, tx_state, opt_state = carry
            raw = raw_gradient(d, key)
            corrected, tx_state = tx.update(raw, tx_state)
            updates, opt_state = opt.update(corrected, opt_state)
            g = d
            cos = lambda a: jnp.sum(a * g) / (jnp.linalg.norm(a) * jnp.linalg.norm(g))
            rel = lambda a: jnp.linalg.norm(a - g) / jnp.linalg.norm(g)
            out = (cos(raw), cos(corrected), rel(raw), rel(corrected), 0.5 * jnp.sum(d * d))
            return (d + updates, tx_state, opt_state), out

        init = (offset, tx.init(offset), opt.init(offset))
        return jax.lax.scan(step, init, jax.random.split(k_data, steps))[1]

    out = jax.jit(jax.vmap(one))(jnp.arange(seeds))
    return [np.asarray(x) for x in out]


def _smooth(x, width=25):
    return np.convolve(x, np.ones(width) / width, mode="valid")


def first_below(losses, threshold):
    hits = np.nonzero(losses <= threshold)[0]
    return int(hits[0]) if hits.size else len(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    start = time.time()
    results, curves = [], {}
    for regime_name, regime in REGIMES.items():
        for problem in PROBLEMS:
            runs = {}
            for method, kwargs in METHODS.items():
                if method == "gc_w_attn_only":
                    with _attn_only():
                        runs[method] = simulate(problem, regime, kwargs, args.seeds, args.steps)
                else:
                    runs[method] = simulate(problem, regime, kwargs, args.seeds, args.steps)
            base_loss = runs["baseline"][4]
            thresholds = base_loss[:, -max(1, args.steps // 5) :].mean(axis=1)
            for method, (cr, cc, rr, rc, loss) in runs.items():
                sl = slice(MEASURE_FROM, None)
                steps_to = [first_below(loss[s], thresholds[s]) for s in range(args.seeds)]
                final = loss[:, -max(1, args.steps // 5) :].mean(axis=1)
                results.append(
                    {
                        "regime": regime_name,
                        "problem": problem,
                        "method": method,
                        "cos_raw": float(cr[:, sl].mean()),
                        "cos_corrected": float(cc[:, sl].mean()),
                        "rel_raw": float(rr[:, sl].mean()),
                        "rel_corrected": float(rc[:, sl].mean()),
                        "final_loss_mean": float(final.mean()),
                        "final_loss_ratio_to_baseline": float(
                            np.mean(final / base_loss[:, -max(1, args.steps // 5) :].mean(axis=1))
                        ),
                        "steps_to_baseline_final": steps_to,
                    }
                )
                curves[(regime_name, problem, method)] = (
                    np.median(loss, axis=0),
                    np.median(cc, axis=0),
                    np.median(cr, axis=0),
                )
            print(f"{regime_name} {problem} done ({time.time() - start:.0f} s)", flush=True)
    elapsed = time.time() - start

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python " + " ".join(["experiments/gc_w_study.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.default_backend()}",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seeds": args.seeds,
        "steps": args.steps,
        "measure_from": MEASURE_FROM,
        "elapsed_s": round(elapsed, 1),
    }
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    lines = [
        "# GC-W learning study",
        "",
        (
            f"Command: `{meta['command']}`; machine: {meta['machine']}; date: {meta['date']}; "
            f"{args.seeds} seeds × {args.steps} steps; {elapsed:.0f} s."
        ),
        "",
        (
            "Problems, regimes and methods: see the docstring of `experiments/gc_w_study.py`. "
            f"Cosines and relative errors are means over steps ≥ {MEASURE_FROM} and seeds; "
            "`final/base` is the mean ratio of the final loss (last 20% of steps) to the "
            "baseline's; `steps` is, per seed, the first step at which the method's loss is "
            f"≤ the baseline's final loss ({args.steps} = not reached)."
        ),
        "",
        (
            "| regime | problem | method | cos raw | cos corrected | rel err raw | rel err corrected "
            "| final/base | steps |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['regime']} | {r['problem']} | {r['method']} | {r['cos_raw']:.3f} | "
            f"{r['cos_corrected']:.3f} | {r['rel_raw']:.2f} | {r['rel_corrected']:.2f} | "
            f"{r['final_loss_ratio_to_baseline']:.2f} | {r['steps_to_baseline_final']} |"
        )
    lines += ["", NOTES]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2 * len(REGIMES), len(PROBLEMS), figsize=(4.2 * len(PROBLEMS), 2.6 * 2 * len(REGIMES))
    )
    for i, regime_name in enumerate(REGIMES):
        for j, problem in enumerate(PROBLEMS):
            ax_loss, ax_cos = axes[2 * i, j], axes[2 * i + 1, j]
            for k, method in enumerate(METHODS):
                loss, cc, cr = curves[(regime_name, problem, method)]
                color = "k" if method == "baseline" else f"C{k}"
                ax_loss.plot(loss, label=method, lw=1, color=color)
                if method == "baseline":
                    ax_cos.plot(_smooth(cr), label="raw (baseline run)", lw=1, color=color)
                else:
                    ax_cos.plot(_smooth(cc), label=f"{method} corrected", lw=1, color=color)
            ax_loss.set_yscale("log")
            ax_loss.set_title(f"{regime_name} · {problem}: loss (median)", fontsize=8)
            ax_cos.set_title(
                f"{regime_name} · {problem}: cos(·, true grad), moving mean 25", fontsize=8
            )
            ax_cos.axvline(200, color="grey", lw=0.5, ls=":")
            for ax in (ax_loss, ax_cos):
                ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax_loss.legend(fontsize=6)
                ax_cos.legend(fontsize=6)
    fig.suptitle(
        f"GC-W study ({args.seeds} seeds; median curves; warm-up ends at the dotted line)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(OUT / "curves.png", dpi=90)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
