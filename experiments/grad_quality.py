"""Gradient-quality diagnostics: does a correction bring a minibatch gradient closer to the true gradient?

Usage::

    python -m experiments.grad_quality --suite cpu-fmnist            # 3 seeds, the suite's setting
    python -m experiments.grad_quality --suite cpu-fmnist --steps 8 --probes 4,8 --seeds 0  # smoke

Protocol (one seed):

1. The suite's base model and data (``gcgd_jax/configs/<base>.toml``) are
   trained with the baseline optimizer (no correction) for ``--steps`` steps,
   exactly as the suite's 100% run.
2. Every correction rides along as a *shadow*: it sees every minibatch gradient
   of this trajectory and updates its own state (GC-W's predictor trains
   online exactly as in a real run, with the suite's GC-W settings), but its
   output never moves the weights. GC-ODE (gradient mode) is a shadow model:
   its backbone is the baseline's at every step, its branch is trained by its
   auxiliary loss. GCGD = GC-W fed with GC-ODE's backbone gradients.
   PowerGrad and the gradient-norm penalty change the loss, so their
   minibatch gradient is simply computed with their loss at the same weights.
3. At each probe step, the "true" gradient ``g_L`` is the gradient of the
   training loss on ``--large-batch`` training images (train-mode BatchNorm in
   chunks of the batch size, no augmentation), and ``--probe-batches`` fresh
   minibatches give each method's corrected minibatch gradient ``T(g_b)``
   (the same minibatches for every method). We report

   * ``cos_all``: cosine of ``T(g_b)`` and ``g_L`` over all parameters,
   * ``cos_kernels``: the same over the conv/dense kernels only,
   * ``cos_selected``: mean per-leaf cosine over the pre-down-sampling kernels
     (the leaves GC-W corrects),

   so a correction that helps the optimizer by making the step a better
   estimate of the true gradient shows a higher cosine than ``baseline``
   (the raw minibatch gradient). A correction can also help without that
   (e.g. by preconditioning); a lower cosine is not a verdict on its own.

Writes ``grad_quality.json`` (every probe), ``grad_quality.csv`` and
``GRAD_QUALITY.md`` (mean and bootstrap 95% CI over seeds x probe batches, per
method and probe step) and ``grad_quality.png`` to
``experiments/results/grad_quality/<suite>/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from gcgd_jax.cpu_speed import apply_cpu_flags

apply_cpu_flags()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.compare import SUITES
from experiments.stats import bootstrap_mean_ci
from gcgd_jax.models import pre_downsampling_mask
from gcgd_jax.train import build_model, build_optimizer, load_config, load_data, step_options
from gcgd_jax.train.optim import build_correction, kernel_mask
from gcgd_jax.train.step import preprocess
from gcgd_jax.transforms.gradient_norm_penalty import gradient_norm_penalty
from gcgd_jax.transforms.powergrad import powergrad_cross_entropy

ROOT = Path(__file__).resolve().parent
TRANSFORMS = (
    "gc_w",
    "centralize",
    "channel_directed_h0",
    "channel_directed_sobolev",
    "znorm",
    "agr",
    "gc_w_v2",
    "mars_correction",
    "grokfast_ema",
)
METHODS = ("baseline", *TRANSFORMS, "gc_ode_gradient", "gcgd", "powergrad", "gradient_norm_penalty")


def _suite_gc_w_options(suite_name: str) -> dict[str, Any]:
    """GC-W's options in ``suite_name`` (base configuration + the suite's GC-W overrides)."""
    s = SUITES[suite_name]
    return load_config(s.base_config, list(s.overrides_for("gc_w"))).corrections.options["gc_w"]


def _cos(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    dot = sum(jnp.vdot(x, y) for x, y in zip(a, b))
    na = jnp.sqrt(sum(jnp.vdot(x, x) for x in a))
    nb = jnp.sqrt(sum(jnp.vdot(y, y) for y in b))
    return dot / jnp.maximum(na * nb, 1e-30)


class Diagnostics:
    """Baseline trajectory + shadows for one seed (see the module docstring)."""

    def __init__(self, suite: str, seed: int):
        s = SUITES[suite]
        self.cfg = load_config(s.base_config, [f"run.seed={seed}"])
        self.ode_cfg = load_config(s.base_config, [f"run.seed={seed}", "model.gc_ode=gradient"])
        self.train_ds, _ = load_data(self.cfg)
        images = self.train_ds.images
        self.bs = self.cfg.data.batch_size
        self.steps_per_epoch = len(images) // self.bs
        self.opts = step_options(self.cfg)  # only its preprocessing settings are used
        shape = {"num_classes": self.train_ds.num_classes, "in_channels": images.shape[-1]}
        model = build_model(self.cfg, **shape)
        model.train()
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        ode_model = build_model(self.ode_cfg, **shape)
        ode_model.train()
        self.ode_graphdef, ode_params, self.ode_rest = nnx.split(ode_model, nnx.Param, ...)
        self.ode_branch = ode_params["gc_ode"]
        self.rng = np.random.default_rng(seed)
        self.key = jax.random.PRNGKey(seed)

        self.kernel_idx = [
            i for i, leaf in enumerate(jax.tree.leaves(kernel_mask(self.params))) if leaf
        ]
        self.selected_idx = [
            i for i, leaf in enumerate(jax.tree.leaves(pre_downsampling_mask(model))) if leaf
        ]
        self._build(suite, model, ode_model, seed)

    def _build(self, suite: str, model, ode_model, seed: int) -> None:
        cfg, opts = self.cfg, self.opts
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = total
        self.tx = build_optimizer(
            cfg,
            params=self.params,
            model=model,
            total_steps=total,
            steps_per_epoch=self.steps_per_epoch,
        ).tx
        self.opt_state = self.tx.init(self.params)
        _, ode_params, _ = nnx.split(ode_model, nnx.Param, ...)
        self.ode_tx = build_optimizer(
            self.ode_cfg,
            params=ode_params,
            model=ode_model,
            total_steps=total,
            steps_per_epoch=self.steps_per_epoch,
        ).tx
        self.ode_opt_state = self.ode_tx.init(ode_params)

        gc_w_opts = _suite_gc_w_options(suite)
        self.shadows: dict[str, optax.GradientTransformation] = {}
        for name in TRANSFORMS:
            options = gc_w_opts if name == "gc_w" else {}
            self.shadows[name] = build_correction(
                name, options, params=self.params, model=model, seed=seed
            )
        self.shadows["gcgd"] = build_correction(
            "gc_w", gc_w_opts, params=self.params, model=model, seed=seed
        )
        self.shadow_states = {n: tx.init(self.params) for n, tx in self.shadows.items()}

        graphdef, ode_graphdef = self.graphdef, self.ode_graphdef

        def ce_loss(
            params, rest, x, labels, per_example=optax.softmax_cross_entropy_with_integer_labels
        ):
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = jnp.mean(per_example(m(x), labels))
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        def ode_loss(params, rest, x, labels):
            m = nnx.merge(ode_graphdef, params, rest, copy=True)
            logits, aux = m(x, return_aux=True)
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
            total = loss + self.ode_cfg.model.gc_ode_aux_weight * aux["gc_ode_loss"]
            return total, nnx.state(m, nnx.Not(nnx.Param))

        pg_alpha = cfg.loss.powergrad_alpha

        def pg_loss(params, rest, x, labels):
            return ce_loss(
                params, rest, x, labels, lambda lg, lb: powergrad_cross_entropy(lg, lb, pg_alpha)
            )

        ce_grad = jax.value_and_grad(ce_loss, has_aux=True)
        ode_grad = jax.value_and_grad(ode_loss, has_aux=True)
        pg_grad = jax.value_and_grad(pg_loss, has_aux=True)
        gnp_grad = gradient_norm_penalty(
            ce_loss, cfg.loss.penalty_radius, cfg.loss.penalty_alpha, argnums=0, has_aux=True
        )

        def with_backbone(branch, params):
            return nnx.merge_state(params, nnx.State({"gc_ode": branch}))

        def ode_rest_from(rest):
            # The backbone's BatchNorm statistics are the baseline's; GC-ODE has none of its own.
            return nnx.merge_state(self.ode_rest, rest)

        @jax.jit
        def train_step(
            params, rest, opt_state, branch, ode_opt_state, shadow_states, images, labels, key
        ):
            x = preprocess(images, opts, key)
            (_, new_rest), g = ce_grad(params, rest, x, labels)
            updates, opt_state = self.tx.update(g, opt_state, params)
            ode_params = with_backbone(branch, params)
            (_, _), g_ode = ode_grad(ode_params, ode_rest_from(rest), x, labels)
            ode_updates, ode_opt_state = self.ode_tx.update(g_ode, ode_opt_state, ode_params)
            branch = optax.apply_updates(ode_params, ode_updates)["gc_ode"]
            g_backbone = nnx.filter_state(g_ode, lambda path, _: path[0] != "gc_ode")
            new_shadow = {}
            for name, tx in self.shadows.items():
                feed = g_backbone if name == "gcgd" else g
                new_shadow[name] = tx.update(feed, shadow_states[name], params)[1]
            return (
                optax.apply_updates(params, updates),
                new_rest,
                opt_state,
                branch,
                ode_opt_state,
                new_shadow,
            )

        @jax.jit
        def large_grad(params, rest, images, labels):
            x = preprocess(images, opts, None)
            return ce_grad(params, rest, x, labels)[1]

        @jax.jit
        def probe(params, rest, branch, shadow_states, images, labels, g_large):
            x = preprocess(images, opts, None)
            g = ce_grad(params, rest, x, labels)[1]
            _, g_ode = ode_grad(with_backbone(branch, params), ode_rest_from(rest), x, labels)
            g_backbone = nnx.filter_state(g_ode, lambda path, _: path[0] != "gc_ode")
            out = {"baseline": g, "gc_ode_gradient": g_backbone}
            for name, tx in self.shadows.items():
                feed = g_backbone if name == "gcgd" else g
                out[name] = tx.update(feed, shadow_states[name], params)[0]
            out["powergrad"] = pg_grad(params, rest, x, labels)[1]
            out["gradient_norm_penalty"] = gnp_grad(params, rest, x, labels)[1]
            ref = jax.tree.leaves(g_large)
            result = {}
            for name, tree in out.items():
                leaves = jax.tree.leaves(tree)
                result[name] = {
                    "cos_all": _cos(leaves, ref),
                    "cos_kernels": _cos(
                        [leaves[i] for i in self.kernel_idx], [ref[i] for i in self.kernel_idx]
                    ),
                    "cos_selected": jnp.mean(
                        jnp.stack([_cos([leaves[i]], [ref[i]]) for i in self.selected_idx])
                    ),
                }
            return result

        self._train_step, self._large_grad, self._probe = train_step, large_grad, probe

    def _batch(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.train_ds.labels), self.bs, replace=False)
        return self.train_ds.images[idx], self.train_ds.labels[idx]

    def run(self, probes: list[int], large_batch: int, probe_batches: int) -> list[dict]:
        records = []
        order = self.rng.permutation(len(self.train_ds.labels))
        for step in range(1, max(probes) + 1):
            e, b = divmod(step - 1, self.steps_per_epoch)
            if b == 0 and e > 0:
                order = self.rng.permutation(len(self.train_ds.labels))
            idx = order[b * self.bs : (b + 1) * self.bs]
            key = jax.random.fold_in(self.key, step)
            (
                self.params,
                self.rest,
                self.opt_state,
                self.ode_branch,
                self.ode_opt_state,
                self.shadow_states,
            ) = self._train_step(
                self.params,
                self.rest,
                self.opt_state,
                self.ode_branch,
                self.ode_opt_state,
                self.shadow_states,
                self.train_ds.images[idx],
                self.train_ds.labels[idx],
                key,
            )
            if step in probes:
                records += self._probe_at(step, large_batch, probe_batches)
        return records

    def _probe_at(self, step: int, large_batch: int, probe_batches: int) -> list[dict]:
        n = len(self.train_ds.labels)
        idx = self.rng.choice(n, min(large_batch, n), replace=False)
        chunks = [idx[i : i + self.bs] for i in range(0, len(idx) - self.bs + 1, self.bs)]
        g_large = None
        for c in chunks:
            g = self._large_grad(
                self.params, self.rest, self.train_ds.images[c], self.train_ds.labels[c]
            )
            g_large = g if g_large is None else jax.tree.map(jnp.add, g_large, g)
        g_large = jax.tree.map(lambda x: x / len(chunks), g_large)
        out = []
        for p in range(probe_batches):
            images, labels = self._batch()
            res = self._probe(
                self.params, self.rest, self.ode_branch, self.shadow_states, images, labels, g_large
            )
            for method, vals in res.items():
                out.append(
                    {
                        "step": step,
                        "probe": p,
                        "method": method,
                        **{k: float(v) for k, v in vals.items()},
                    }
                )
        return out


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    steps = sorted({r["step"] for r in records})
    for m in METHODS:
        for s in steps:
            cell = [r for r in records if r["method"] == m and r["step"] == s]
            if not cell:
                continue
            row = {"method": m, "step": s, "n": len(cell)}
            base = {
                (r["seed"], r["probe"]): r
                for r in records
                if r["method"] == "baseline" and r["step"] == s
            }
            for k in ("cos_all", "cos_kernels", "cos_selected"):
                mean, lo, hi = bootstrap_mean_ci([r[k] for r in cell], n_boot=2000)
                row.update({k: mean, f"{k}_lo": lo, f"{k}_hi": hi})
                # Paired with the baseline: same weights, same minibatch.
                diffs = [r[k] - base[(r["seed"], r["probe"])][k] for r in cell]
                mean, lo, hi = bootstrap_mean_ci(diffs, n_boot=2000)
                row.update({f"d_{k}": mean, f"d_{k}_lo": lo, f"d_{k}_hi": hi})
            rows.append(row)
    return rows


def write_outputs(out: Path, records: list[dict], rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_quality.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1) + "\n"
    )
    with open(out / "grad_quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    steps = sorted({r["step"] for r in rows})
    lines = [
        f"# Gradient quality, suite {meta['suite']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}; {meta['wall_s']:.0f} s.",
        "",
        (
            "Cosine between each method's minibatch gradient (batch "
            f"{meta['batch_size']}) and the gradient on {meta['large_batch']} training images, "
            f"at steps {', '.join(map(str, steps))} of a baseline run of {meta['total_steps']} steps; "
            f"mean over {len(meta['seeds'])} seeds × {meta['probe_batches']} minibatches, "
            "[bootstrap 95% CI]. Protocol: `experiments/grad_quality.py` docstring."
        ),
        "",
    ]
    for key, title in (
        ("cos_all", "All parameters"),
        ("cos_selected", "Pre-down-sampling kernels (GC-W's leaves), mean per-leaf cosine"),
        (
            "d_cos_all",
            "All parameters: paired difference from the baseline (same weights and minibatch)",
        ),
        (
            "d_cos_selected",
            "Pre-down-sampling kernels: paired difference from the baseline",
        ),
    ):
        lines += [
            f"## {title}",
            "",
            "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for m in METHODS:
            cells = {r["step"]: r for r in rows if r["method"] == m}
            if not cells or (key.startswith("d_") and m == "baseline"):
                continue
            lines.append(
                f"| {m} | "
                + " | ".join(
                    f"{cells[s][key]:+.3f} [{cells[s][key + '_lo']:+.3f}, {cells[s][key + '_hi']:+.3f}]"
                    if key.startswith("d_")
                    else f"{cells[s][key]:.3f} [{cells[s][key + '_lo']:.3f}, {cells[s][key + '_hi']:.3f}]"
                    for s in steps
                )
                + " |"
            )
        lines.append("")
    lines += ["![cosine vs step](grad_quality.png)", ""]
    (out / "GRAD_QUALITY.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, key in zip(axes, ("cos_all", "cos_selected")):
        for m in METHODS:
            cells = sorted((r for r in rows if r["method"] == m), key=lambda r: r["step"])
            if not cells:
                continue
            x = [r["step"] for r in cells]
            ax.errorbar(
                x,
                [r[key] for r in cells],
                yerr=[
                    [r[key] - r[key + "_lo"] for r in cells],
                    [r[key + "_hi"] - r[key] for r in cells],
                ],
                marker="o",
                capsize=2,
                label=m,
                lw=2 if m == "baseline" else 1,
                color="k" if m == "baseline" else None,
            )
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine to large-batch gradient")
        ax.set_title("all parameters" if key == "cos_all" else "pre-down-sampling kernels")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_quality.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu-fmnist", choices=("cpu-fmnist", "cpu-cifar10"))
    parser.add_argument("--steps", type=int, help="training steps (default: the suite's 100%% run)")
    parser.add_argument(
        "--probes", help="comma-separated probe steps (default: quarters of --steps)"
    )
    parser.add_argument("--large-batch", type=int, default=2048)
    parser.add_argument("--probe-batches", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--from-json",
        type=Path,
        help="rebuild the tables and plot from an earlier grad_quality.json",
    )
    args = parser.parse_args(argv)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
        write_outputs(out, saved["records"], summarize(saved["records"]), saved["meta"])
        print((out / "GRAD_QUALITY.md").read_text())
        return 0

    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    records: list[dict] = []
    meta: dict[str, Any] = {}
    for seed in seeds:
        d = Diagnostics(args.suite, seed)
        steps = args.steps or d.total_steps
        probes = (
            sorted({int(p) for p in args.probes.split(",")})
            if args.probes
            else sorted({max(1, round(steps * q / 4)) for q in (1, 2, 3, 4)})
        )
        if min(probes) < 1 or max(probes) > steps:
            parser.error(f"--probes must lie in 1..{steps}, got {probes}")
        for r in d.run(probes, args.large_batch, args.probe_batches):
            records.append({"seed": seed, **r})
        meta = {"batch_size": d.bs, "total_steps": steps}
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = summarize(records)
    meta.update(
        suite=args.suite,
        seeds=seeds,
        large_batch=args.large_batch,
        probe_batches=args.probe_batches,
        command="python -m experiments.grad_quality "
        + " ".join(sys.argv[1:] if argv is None else argv),
        machine=f"{platform.platform()}, {os.cpu_count()} cores, jax {jax.__version__}",
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        wall_s=time.perf_counter() - t0,
    )
    out = args.out or ROOT / "results" / "grad_quality" / args.suite
    write_outputs(out, records, rows, meta)
    print((out / "GRAD_QUALITY.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
