"""Gradient-quality diagnostics: does a correction bring a minibatch gradient closer to the true gradient?

Usage::

    python -m experiments.studies.grad_quality --suite cpu-fmnist            # 3 seeds, the suite's setting
    python -m experiments.studies.grad_quality --suite cpu-fmnist --steps 8 --probes 4,8 --seeds 0  # smoke

Protocol (one seed):

1. The suite's baseline run (``gcgd_jax/configs/<base>.toml`` with the suite's
   overrides, this seed) is trained step by step through the public seams of
   :class:`gcgd_jax.train.Trainer`: its data order (``Trainer.replica_batches``), its
   gradient (``Trainer.grad_fn``: the run's loss, augmentation key and model)
   and its update (``Trainer.update_fn``: the run's optimizer and schedule over
   the run's ``total_steps``), for ``--steps`` steps. The trajectory is the
   run's own.
2. Every method of the registry (:mod:`gcgd_jax.methods`) that can be compared
   on the baseline's weights rides along:

   * ``"transform"`` methods are *shadows*: each sees every minibatch
     gradient of this trajectory and updates its own state (GC-W's predictor
     trains online exactly as in a real run, with the suite's settings for that
     method), but its output never moves the weights;
   * GC-ODE in gradient mode is a shadow model: its backbone is the
     baseline's at every step, its branch is trained by its auxiliary loss
     with its own optimizer; its gradient is the run's gradient function of
     that configuration. GCGD = GC-W fed with GC-ODE's backbone gradients;
   * ``"loss"`` and ``"gradient"`` methods (PowerGrad, the gradient-norm
     penalty) and backward gradient normalization change the gradient
     function only, so their minibatch gradient is the gradient function of
     their configuration at the same weights.

   GC-ODE's branch mode and its controls change the forward pass, so there is
   no "same weights" gradient to compare; they are not probed.
3. At each probe step, the "true" gradient ``g_L`` is the gradient of the
   training loss on ``--large-batch`` training images (train-mode BatchNorm in
   chunks of the batch size, no augmentation), and ``--probe-batches`` fresh
   minibatches give each method's corrected minibatch gradient ``T(g_b)``
   (the same minibatches for every method, no augmentation). We report

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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gcgd_jax.ops import apply_cpu_flags

apply_cpu_flags()

import dataclasses
import io
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import ROOT as EXPERIMENTS
from experiments.common.provenance import git_commit
from experiments.suites.compare import suites
from experiments.suites.stats import bootstrap_mean_ci
from gcgd_jax import methods as registry
from gcgd_jax.models import pre_downsampling_mask
from gcgd_jax.models.gc_ode import GateFit
from gcgd_jax.train import (
    Trainer,
    build_model,
    build_optimizer,
    load_config,
    make_grad_fn,
    step_options,
)
from gcgd_jax.train.optim import build_correction, kernel_mask

ROOT = EXPERIMENTS
TRANSFORMS = tuple(m.name for m in registry.methods_of_kind("transform"))
# Methods that change only how the gradient is computed (same forward pass, same
# parameters): their gradient at the baseline's weights is their own gradient function's.
GRADIENT_FUNCTIONS = (
    *(m.name for m in registry.methods_of_kind("loss")),
    *(m.name for m in registry.methods_of_kind("gradient")),
    "backward_grad_norm",
)
METHODS = ("baseline", *TRANSFORMS, "gc_ode_gradient", "gcgd", *GRADIENT_FUNCTIONS)


def _cos(a: list[jax.Array], b: list[jax.Array]) -> jax.Array:
    dot = sum(jnp.vdot(x, y) for x, y in zip(a, b))
    na = jnp.sqrt(sum(jnp.vdot(x, x) for x in a))
    nb = jnp.sqrt(sum(jnp.vdot(y, y) for y in b))
    return dot / jnp.maximum(na * nb, 1e-30)


def _in_gc_ode(path, _value) -> bool:
    """State filter: GC-ODE's part of a model state (its branches and gates)."""
    return path[0] == "gc_ode"


class Diagnostics:
    """Baseline trajectory + shadows for one seed (see the module docstring)."""

    def __init__(self, suite: str, seed: int):
        s = self.suite = suites()[suite]
        self.common = [f"run.seed={seed}", "checkpoint.enabled=false", "log.progress=false"]
        self.cfg = load_config(s.base_config, [*s.overrides, *self.common])
        self.trainer = Trainer(
            self.cfg, out_dir=tempfile.mkdtemp(prefix="grad_quality_"), stream=io.StringIO()
        )
        t = self.trainer
        self.train_ds, self.bs = t.train_ds, self.cfg.data.batch_size
        self.total_steps = t.total_steps
        self.rng = np.random.default_rng(seed)
        self.state = t.replica_state()  # the run's state, advanced by run() (one replica)
        params = self.state.params
        model = nnx.merge(t.graphdef, params, self.state.rest)
        self.kernel_idx = [i for i, leaf in enumerate(jax.tree.leaves(kernel_mask(params))) if leaf]
        self.selected_idx = [
            i for i, leaf in enumerate(jax.tree.leaves(pre_downsampling_mask(model))) if leaf
        ]
        self._build_shadows(model, seed)
        self._build_gc_ode()
        self._build_functions()

    def _method_cfg(self, name: str):
        return load_config(self.suite.base_config, [*self.suite.overrides_for(name), *self.common])

    def _build_shadows(self, model, seed: int) -> None:
        params = self.state.params

        def correction(name: str) -> optax.GradientTransformation:
            options = self._method_cfg(name).corrections.options.get(name, {})
            return build_correction(name, options, params=params, model=model, seed=seed)

        self.shadows = {name: correction(name) for name in TRANSFORMS}
        gcgd = registry.get("gcgd")
        # GCGD's transforms, in the suite's settings for GCGD.
        chain = self._method_cfg("gcgd").corrections
        self.shadows["gcgd"] = optax.chain(
            *(
                build_correction(
                    name, chain.options.get(name, {}), params=params, model=model, seed=seed
                )
                for name in chain.chain
            )
        )
        assert tuple(chain.chain) == tuple(
            p for p in gcgd.parts if registry.get(p).kind == "transform"
        ), "GCGD's registry entry and its suite configuration disagree"
        self.shadow_states = {n: tx.init(params) for n, tx in self.shadows.items()}

    def _build_gc_ode(self) -> None:
        t = self.trainer
        self.ode_cfg = self._method_cfg("gc_ode_gradient")
        ode_model = build_model(
            self.ode_cfg, num_classes=t.train_ds.num_classes, in_channels=t.image_shape[-1]
        )
        ode_model.train()
        self.ode_graphdef, ode_params, self.ode_rest = nnx.split(ode_model, nnx.Param, ...)
        self.ode_tx = build_optimizer(
            self.ode_cfg,
            params=ode_params,
            model=ode_model,
            total_steps=t.total_steps,
            steps_per_epoch=t.steps_per_epoch,
        ).tx
        self.ode_branch = ode_params["gc_ode"]
        self.ode_fit = nnx.filter_state(self.ode_rest, _in_gc_ode)  # its gates' fit statistics
        self.ode_opt_state = self.ode_tx.init(ode_params)
        self.ode_opts = step_options(self.ode_cfg)

    def _build_functions(self) -> None:
        t = self.trainer
        grad, update = t.grad_fn, t.update_fn  # the run's own train step, in its two halves
        ode_grad = make_grad_fn(self.ode_graphdef, self.ode_opts)

        def no_aug(opts):
            return dataclasses.replace(opts, augment=False)

        probe_grad = make_grad_fn(t.graphdef, no_aug(t.step_options))
        ode_probe_grad = make_grad_fn(self.ode_graphdef, no_aug(self.ode_opts))
        method_grads = {}
        for name in GRADIENT_FUNCTIONS:
            cfg = self._method_cfg(name)
            model = build_model(
                cfg, num_classes=t.train_ds.num_classes, in_channels=t.image_shape[-1]
            )
            model.train()
            graphdef = nnx.split(model, nnx.Param, ...)[0]  # e.g. backward_grad_norm's layers
            opts = no_aug(step_options(cfg))
            method_grads[name] = make_grad_fn(graphdef, opts)
        shadows, ode_rest, ode_tx = self.shadows, self.ode_rest, self.ode_tx
        kernel_idx, selected_idx = self.kernel_idx, self.selected_idx

        def ode_state(state, branch, fit):
            # GC-ODE's backbone is the baseline's (parameters and BatchNorm statistics); its
            # branch and its gates' fit are the shadow's own, carried from step to step.
            params = nnx.merge_state(state.params, nnx.State({"gc_ode": branch}))
            rest = nnx.merge_state(ode_rest, state.rest, fit)
            return state._replace(params=params, rest=rest)

        def backbone(g_ode):
            return nnx.filter_state(g_ode, nnx.Not(_in_gc_ode))

        def corrected(shadow_states, params, g, g_backbone):
            return {
                name: tx.update(g_backbone if name == "gcgd" else g, shadow_states[name], params)
                for name, tx in shadows.items()
            }

        @jax.jit
        def advance(state, branch, fit, ode_opt_state, shadow_states, x, y, fb):
            g, aux = grad(state, x, y, fb)
            o = ode_state(state, branch, fit)
            g_ode, ode_aux = ode_grad(o, x, y, fb)
            fit = nnx.filter_state(ode_aux.rest, _in_gc_ode)  # the gates' updated fit
            ode_updates, ode_opt_state = ode_tx.update(g_ode, ode_opt_state, o.params)
            branch = optax.apply_updates(o.params, ode_updates)["gc_ode"]
            outs = corrected(shadow_states, state.params, g, backbone(g_ode))
            state, _ = update(state, g, aux, y)
            shadow_states = {n: out[1] for n, out in outs.items()}
            return state, branch, fit, ode_opt_state, shadow_states

        @jax.jit
        def large_grad(state, x, y, fb):
            return probe_grad(state, x, y, fb)[0]

        @jax.jit
        def probe(state, branch, fit, shadow_states, x, y, g_large, fb):
            g = probe_grad(state, x, y, fb)[0]
            g_backbone = backbone(ode_probe_grad(ode_state(state, branch, fit), x, y, fb)[0])
            out = {"baseline": g, "gc_ode_gradient": g_backbone}
            for name, (updates, _) in corrected(shadow_states, state.params, g, g_backbone).items():
                out[name] = updates
            for name, fn in method_grads.items():
                out[name] = fn(state, x, y, fb)[0]
            ref = jax.tree.leaves(g_large)
            result = {}
            for name, tree in out.items():
                leaves = jax.tree.leaves(tree)
                result[name] = {
                    "cos_all": _cos(leaves, ref),
                    "cos_kernels": _cos(
                        [leaves[i] for i in kernel_idx], [ref[i] for i in kernel_idx]
                    ),
                    "cos_selected": jnp.mean(
                        jnp.stack([_cos([leaves[i]], [ref[i]]) for i in selected_idx])
                    ),
                }
            return result

        self._advance, self._large_grad, self._probe = advance, large_grad, probe

    def _put(self, images: np.ndarray, labels: np.ndarray):
        put = self.trainer.parallel.put_global
        return put(images), put(labels)

    def run(self, probes: list[int], large_batch: int, probe_batches: int) -> list[dict]:
        """Trains the run's first ``max(probes)`` steps, probing after each step in ``probes``."""
        t = self.trainer
        records, step = [], 0
        for epoch in range(t.num_epochs):
            for images, labels in t.replica_batches(epoch):
                if step >= max(probes):
                    return records
                (
                    self.state,
                    self.ode_branch,
                    self.ode_fit,
                    self.ode_opt_state,
                    self.shadow_states,
                ) = self._advance(
                    self.state,
                    self.ode_branch,
                    self.ode_fit,
                    self.ode_opt_state,
                    self.shadow_states,
                    *self._put(images, labels),
                    t.fusion_breaker,
                )
                step += 1
                if step in probes:
                    records += self._probe_at(step, large_batch, probe_batches)
        return records

    def _probe_at(self, step: int, large_batch: int, probe_batches: int) -> list[dict]:
        t = self.trainer
        n = len(self.train_ds.labels)
        idx = self.rng.choice(n, min(large_batch, n), replace=False)
        chunks = [idx[i : i + self.bs] for i in range(0, len(idx) - self.bs + 1, self.bs)]
        g_large = None
        for c in chunks:
            x, y = self._put(self.train_ds.images[c], self.train_ds.labels[c])
            g = self._large_grad(self.state, x, y, t.fusion_breaker)
            g_large = g if g_large is None else jax.tree.map(jnp.add, g_large, g)
        g_large = jax.tree.map(lambda x: x / len(chunks), g_large)
        fits = jax.tree.leaves(nnx.filter_state(self.ode_fit, GateFit))
        gate = self.ode_cfg.model.gc_ode["gate_max"] * float(np.mean(fits))  # the shadow's mean s
        out = []
        for p in range(probe_batches):
            pick = self.rng.choice(n, self.bs, replace=False)
            x, y = self._put(self.train_ds.images[pick], self.train_ds.labels[pick])
            res = self._probe(
                self.state,
                self.ode_branch,
                self.ode_fit,
                self.shadow_states,
                x,
                y,
                g_large,
                t.fusion_breaker,
            )
            for method, vals in res.items():
                out.append(
                    {
                        "step": step,
                        "probe": p,
                        "method": method,
                        **{k: float(v) for k, v in vals.items()},
                        **({"gc_ode_gate": gate} if method in ("gc_ode_gradient", "gcgd") else {}),
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
        (
            f"Machine: {meta['machine']}; date {meta['date']}; commit {meta.get('commit')}; "
            f"{meta['wall_s']:.0f} s."
        ),
        "",
        (
            "Cosine between each method's minibatch gradient (batch "
            f"{meta['batch_size']}) and the gradient on {meta['large_batch']} training images, "
            f"at steps {', '.join(map(str, steps))} of a baseline run of {meta['total_steps']} steps; "
            f"mean over {len(meta['seeds'])} seeds × {meta['probe_batches']} minibatches, "
            "[bootstrap 95% CI]. Protocol: `experiments/studies/grad_quality.py` docstring."
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
    gates = {
        step: statistics.fmean(r["gc_ode_gate"] for r in cell)
        for step in steps
        if (cell := [r for r in records if r["step"] == step and "gc_ode_gate" in r])
    }
    if gates:
        lines += [
            "GC-ODE's shadow: mean gate s over pairs and seeds at each probe step (0 = the "
            "plain gradient): "
            + ", ".join(f"step {step}: {g:.3f}" for step, g in gates.items())
            + ".",
            "",
        ]
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
        command="python -m experiments.studies.grad_quality "
        + " ".join(sys.argv[1:] if argv is None else argv),
        machine=f"{platform.platform()}, {os.cpu_count()} cores, jax {jax.__version__}",
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        commit=git_commit(),
        wall_s=time.perf_counter() - t0,
    )
    out = args.out or ROOT / "results" / "grad_quality" / args.suite
    write_outputs(out, records, rows, meta)
    print((out / "GRAD_QUALITY.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
