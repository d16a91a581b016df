"""GC-ODE backward matching: does the Sobolev term make the branch's backward map the stage's?

Usage::

    python -m experiments.gc_ode_matching --suite cpu-cifar10             # seeds 0,1,2; lambda 0 and 1
    python -m experiments.gc_ode_matching --suite cpu-cifar10 --seeds 0 --steps 8   # smoke

Protocol (one seed, one ``sobolev_weight`` lambda): the suite's GC-ODE gradient-mode
run (``gcgd_jax/configs/<base>.toml`` with the suite's overrides and
``model.gc_ode=gradient``, ``model.gc_ode_sobolev_weight=lambda``) is trained
through :class:`gcgd_jax.train.Trainer` (its own data order, loss, optimizer and
schedule). At the probe steps (quarters of the run), on ``--probe-batches`` fixed
training batches (no augmentation, train-mode BatchNorm), for every GC-ODE pair
``(h_{i-1}, h_i)``:

* ``g = dL/dh_i`` is the gradient of the cross-entropy through the plain rest of
  the network (gradient mode's forward pass is the plain network's);
* ``a = J_stage^T g`` and ``b = J_branch^T g`` (the branch's input VJP at
  ``h_{i-1}``);
* reported: ``cos(a, b)`` and the relative error ``||b - a|| / ||a||``, and the
  gate ``s`` the pair uses.

The same seeds run with lambda = 0 (output matching alone) and the given lambda, so
the differences are paired. Final test accuracy comes from the trainer's
evaluation. Writes ``gc_ode_matching.json`` and ``GC_ODE_MATCHING.md`` to
``experiments/results/gc_ode_matching/<suite>/``.
"""

from __future__ import annotations

from gcgd_jax.cpu_speed import apply_cpu_flags

apply_cpu_flags()

import argparse
import datetime as _dt
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.compare import SUITES
from experiments.stats import t_mean_ci
from gcgd_jax.train import Trainer, load_config

ROOT = Path(__file__).resolve().parent


def _norm(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32))))


def make_matching_fn(graphdef: nnx.GraphDef):
    """``(params, rest, x, y, fusion_breaker) -> (cos, rel_err)``, each ``(pairs,)``."""

    def pieces(params, rest):
        return nnx.merge(graphdef, params, rest, copy=True)

    def fn(params, rest, x, y, fb):
        model = pieces(params, rest)
        hs = model.stage_outputs(x, fusion_breaker=fb)
        cos, rel = [], []
        for i in range(len(hs) - 1):

            def tail(h, i=i):
                m = pieces(params, rest)
                for stage in list(m.stages)[i + 1 :]:
                    h = stage(h, fb)
                logits = m.head(jnp.mean(h, axis=(1, 2)))
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

            g = jax.grad(tail)(hs[i + 1])
            a = jax.vjp(lambda h, i=i: pieces(params, rest).stages[i](h, fb), hs[i])[1](g)[0]
            b = jax.vjp(lambda h, i=i: pieces(params, rest).gc_ode.branches[i].solve(h), hs[i])[1](
                g
            )[0]
            na, nb = _norm(a), _norm(b)
            cos.append(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)) / (na * nb + 1e-30))
            rel.append(_norm(b - a) / (na + 1e-30))
        return jnp.stack(cos), jnp.stack(rel)

    return fn


def run_one(suite: str, seed: int, weight: float, steps: int | None, probe_batches: int) -> dict:
    s = SUITES[suite]
    overrides = [
        *s.overrides,
        "model.gc_ode=gradient",
        f"model.gc_ode_sobolev_weight={weight}",
        f"run.seed={seed}",
        "checkpoint.enabled=false",
        "log.progress=false",
    ]
    cfg = load_config(s.base_config, overrides)
    t = Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="gc_ode_matching_"), stream=io.StringIO())
    total = steps or t.total_steps
    probes = sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)})
    rng = np.random.default_rng(1000 + seed)  # the same probe batches for every lambda
    n, bs = len(t.train_ds.labels), t.cfg.data.batch_size
    idx = [rng.choice(n, bs, replace=False) for _ in range(probe_batches)]
    from gcgd_jax.data.augment import normalize

    mean = np.asarray(t.step_options.mean, np.float32)
    std = np.asarray(t.step_options.std, np.float32)
    batches = [
        (normalize(jnp.asarray(t.train_ds.images[i]), mean, std), jnp.asarray(t.train_ds.labels[i]))
        for i in idx
    ]
    matching = jax.jit(make_matching_fn(t.graphdef))
    records: list[dict[str, Any]] = []

    def probe(step: int) -> None:
        model = nnx.merge(t.graphdef, t.state.params, t.state.rest)
        gates = [float(g) for g in model.gc_ode.gates()]
        for b, (x, y) in enumerate(batches):
            cos, rel = matching(t.state.params, t.state.rest, x, y, t.fusion_breaker)
            for pair, (c, r) in enumerate(zip(cos.tolist(), rel.tolist(), strict=True)):
                records.append(
                    {
                        "step": step,
                        "batch": b,
                        "pair": pair,
                        "cos": c,
                        "rel_err": r,
                        "gate": gates[pair],
                    }
                )

    step = 0
    epoch = 0
    while step < total:
        end = min((epoch + 1) * t.steps_per_epoch, total)
        for p in probes:  # train up to each probe inside this epoch, then measure
            if step < p <= end:
                t.train_epoch(epoch, step, p)
                step = p
                probe(step)
        if step < end:
            t.train_epoch(epoch, step, end)
            step = end
        epoch += 1
    acc = t.evaluate()[f"{t.eval_prefix}_acc"]
    return {
        "seed": seed,
        "sobolev_weight": weight,
        "steps": total,
        "probes": probes,
        "final_acc": acc,
        "records": records,
    }


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def paired_t(diffs: list[float]) -> dict[str, float | None]:
    """Mean of paired differences with its Student-t 95% interval (None with one seed)."""
    mean, lo, hi = t_mean_ci(diffs)
    finite = bool(np.isfinite(lo) and np.isfinite(hi))
    return {
        "mean": mean,
        "lo": lo if finite else None,
        "hi": hi if finite else None,
        "n": len(diffs),
    }


def summarize(runs: list[dict], weight: float) -> list[dict]:
    """Per (probe step, pair): mean cos / rel_err per lambda over seeds x batches, and the paired
    difference (lambda - 0) of the per-seed means with its Student-t 95% CI."""
    rows = []
    by = {}
    for run in runs:
        for r in run["records"]:
            key = (r["step"], r["pair"], run["sobolev_weight"], run["seed"])
            by.setdefault(key, []).append(r)
    steps = sorted({k[0] for k in by})
    pairs = sorted({k[1] for k in by})
    seeds = sorted({k[3] for k in by})
    for step in steps:
        for pair in pairs:
            row: dict[str, Any] = {"step": step, "pair": pair}
            for metric in ("cos", "rel_err"):
                per_seed = {}
                for w in (0.0, weight):
                    per_seed[w] = [
                        _mean([r[metric] for r in by.get((step, pair, w, s), [])]) for s in seeds
                    ]
                    row[f"{metric}@{w:g}"] = _mean(per_seed[w])
                diffs = [b - a for a, b in zip(per_seed[0.0], per_seed[weight], strict=True)]
                row[f"{metric}_diff"] = paired_t(diffs)
            rows.append(row)
    return rows


def _fmt_ci(d: dict) -> str:
    if d.get("lo") is None:
        return f"{d['mean']:+.3f}"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def write_outputs(out: Path, runs: list[dict], rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gc_ode_matching.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1) + "\n"
    )
    w = meta["sobolev_weight"]
    acc = {}
    for run in runs:
        acc.setdefault(run["sobolev_weight"], {})[run["seed"]] = run["final_acc"]
    seeds = sorted(acc.get(0.0, {}))
    acc_diff = paired_t([100 * (acc[w][s] - acc[0.0][s]) for s in seeds if s in acc.get(w, {})])
    header = (
        f"- machine: {meta['machine']}; date {meta['date']}; commit {meta['commit']}; "
        f"wall {meta['wall_s']:.0f} s"
    )
    protocol = (
        f"- seeds {meta['seeds']} (paired: the same seed for lambda = 0 and lambda = {w:g}), "
        f"{meta['probe_batches']} probe batches of {meta['batch_size']} training images per probe"
    )
    what = (
        "Per GC-ODE pair and probe step: cos(J_branch^T g, J_stage^T g) and "
        "||J_branch^T g - J_stage^T g|| / ||J_stage^T g|| (mean over seeds x batches), and the "
        f"paired difference lambda = {w:g} minus lambda = 0 (Student-t 95% CI over seeds)."
    )
    columns = (
        f"| step | pair | cos @ 0 | cos @ {w:g} | Δ cos | rel. error @ 0 | rel. error @ {w:g} "
        "| Δ rel. error |"
    )
    lines = [
        f"# GC-ODE backward matching, suite {meta['suite']}",
        "",
        f"- command: `{meta['command']}`",
        header,
        protocol,
        "",
        what,
        "",
        columns,
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['pair']} | {r['cos@0']:.3f} | {r[f'cos@{w:g}']:.3f} | "
            f"{_fmt_ci(r['cos_diff'])} | {r['rel_err@0']:.3f} | {r[f'rel_err@{w:g}']:.3f} | "
            f"{_fmt_ci(r['rel_err_diff'])} |"
        )
    final = f"Final test accuracy, lambda = {w:g} minus lambda = 0: {_fmt_ci(acc_diff)} pp "
    lines += ["", f"{final}(seeds {seeds}).", ""]
    (out / "GC_ODE_MATCHING.md").write_text("\n".join(lines))


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu-cifar10", choices=("cpu-fmnist", "cpu-cifar10"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--weight", type=float, default=1.0, help="sobolev_weight compared with 0")
    parser.add_argument("--steps", type=int, help="training steps (default: the suite's 100%% run)")
    parser.add_argument("--probe-batches", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.weight > 0:
        parser.error(f"--weight must be > 0, got {args.weight}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        for weight in (0.0, args.weight):
            runs.append(run_one(args.suite, seed, weight, args.steps, args.probe_batches))
            elapsed = time.perf_counter() - t0
            print(f"seed {seed} lambda {weight:g} done ({elapsed:.0f} s)", flush=True)
    cfg = load_config(SUITES[args.suite].base_config, list(SUITES[args.suite].overrides))
    meta = {
        "suite": args.suite,
        "seeds": seeds,
        "sobolev_weight": args.weight,
        "probe_batches": args.probe_batches,
        "batch_size": cfg.data.batch_size,
        "command": "python -m experiments.gc_ode_matching "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores, jax {jax.__version__}",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "wall_s": time.perf_counter() - t0,
    }
    out = args.out or ROOT / "results" / "gc_ode_matching" / args.suite
    write_outputs(out, runs, summarize(runs, args.weight), meta)
    print((out / "GC_ODE_MATCHING.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
