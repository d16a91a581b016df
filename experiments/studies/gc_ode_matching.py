"""GC-ODE backward matching: does the Sobolev term make the branch's backward map the stage's?

Usage::

    python -m experiments.studies.gc_ode_matching --suite cpu-cifar10             # seeds 0,1,2; lambda 0 and 1
    python -m experiments.studies.gc_ode_matching --suite cpu-cifar10 --seeds 0 --steps 8   # smoke
    python -m experiments.studies.gc_ode_matching --suite cpu-cifar10 \
        --compare model.gc_ode.loss_subsample=1,4 --out experiments/results/gc_ode_matching/subsample

``--compare KEY=A,B`` names the one setting the two arms differ in (default
``model.gc_ode.sobolev_weight=0,1``: output matching alone vs with backward
matching); anything else is the suite's GC-ODE gradient-mode run.

Protocol (one seed, one arm): the suite's GC-ODE gradient-mode run
(``gcgd_jax/configs/<base>.toml`` with the suite's overrides,
``model.gc_ode.mode=gradient`` and ``KEY=value``) is trained
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

The same seeds run in both arms, so the differences (B minus A) are paired. Final
test accuracy comes from the trainer's evaluation. Writes ``gc_ode_matching.json`` and ``GC_ODE_MATCHING.md`` to
``experiments/results/gc_ode_matching/<suite>/``.
"""

from __future__ import annotations

from gcgd_jax.ops import apply_cpu_flags

apply_cpu_flags()

import argparse
import datetime as _dt
import io
import json
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

from experiments import ROOT as EXPERIMENTS
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.suites.compare import suites
from experiments.suites.stats import t_mean_ci
from gcgd_jax.train import Trainer, load_config
from gcgd_jax.train.config import ConfigError

ROOT = EXPERIMENTS


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


def arm_config(suite: str, seed: int, setting: tuple[str, str]):
    """The configuration of one arm and seed: the suite's GC-ODE gradient-mode run with
    ``KEY=value`` (raises ``ConfigError`` for a bad key or value)."""
    s = suites()[suite]
    key, value = setting
    overrides = [
        *s.overrides,
        "model.gc_ode.mode=gradient",
        f"{key}={value}",
        f"run.seed={seed}",
        "checkpoint.enabled=false",
        "log.progress=false",
    ]
    return load_config(s.base_config, overrides)


def run_one(
    suite: str, seed: int, setting: tuple[str, str], steps: int | None, probe_batches: int
) -> dict:
    _, value = setting
    cfg = arm_config(suite, seed, setting)
    t = Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="gc_ode_matching_"), stream=io.StringIO())
    total = steps or t.total_steps
    probes = sorted({max(1, round(total * q / 4)) for q in (1, 2, 3, 4)})
    rng = np.random.default_rng(1000 + seed)  # the same probe batches in both arms
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
        state = t.replica_state()
        model = nnx.merge(t.graphdef, state.params, state.rest)
        gates = [float(g) for g in model.gc_ode.gates()]
        for b, (x, y) in enumerate(batches):
            cos, rel = matching(state.params, state.rest, x, y, t.fusion_breaker)
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
    acc = t.evaluate()[0][f"{t.eval_prefix}_acc"]
    return {
        "seed": seed,
        "arm": value,
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


def summarize(runs: list[dict], arms: tuple[str, str]) -> list[dict]:
    """Per (probe step, pair): mean cos / rel_err / gate per arm over seeds x batches, and the
    paired difference (arm B - arm A) of the per-seed means with its Student-t 95% CI."""
    rows = []
    by = {}
    for run in runs:
        for r in run["records"]:
            key = (r["step"], r["pair"], run["arm"], run["seed"])
            by.setdefault(key, []).append(r)
    steps = sorted({k[0] for k in by})
    pairs = sorted({k[1] for k in by})
    seeds = sorted({k[3] for k in by})
    a, b = arms
    for step in steps:
        for pair in pairs:
            row: dict[str, Any] = {"step": step, "pair": pair}
            for metric in ("cos", "rel_err", "gate"):
                per_seed = {}
                for arm in arms:
                    per_seed[arm] = [
                        _mean([r[metric] for r in by.get((step, pair, arm, s), [])]) for s in seeds
                    ]
                    row[f"{metric}@{arm}"] = _mean(per_seed[arm])
                diffs = [y - x for x, y in zip(per_seed[a], per_seed[b], strict=True)]
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
    key, (a, b) = meta["compare"], meta["arms"]
    acc: dict[str, dict[int, float]] = {}
    for run in runs:
        acc.setdefault(run["arm"], {})[run["seed"]] = run["final_acc"]
    seeds = sorted(acc.get(a, {}))
    acc_diff = paired_t([100 * (acc[b][s] - acc[a][s]) for s in seeds if s in acc.get(b, {})])
    lines = [
        f"# GC-ODE backward matching, suite {meta['suite']}: {key} = {a} vs {b}",
        "",
        f"- command: `{meta['command']}`",
        (
            f"- machine: {meta['machine']}; date {meta['date']}; commit {meta['commit']}; "
            f"wall {meta['wall_s']:.0f} s"
        ),
        (
            f"- seeds {meta['seeds']} (paired: the same seed in both arms), "
            f"{meta['probe_batches']} probe batches of {meta['batch_size']} training images "
            "per probe"
        ),
        "",
        (
            "Per GC-ODE pair and probe step: cos(J_branch^T g, J_stage^T g), "
            "||J_branch^T g - J_stage^T g|| / ||J_stage^T g|| and the gate s (mean over seeds "
            f"x batches) in each arm, and the paired difference {b} minus {a} (Student-t 95% "
            "CI over seeds)."
        ),
        "",
        (
            f"| step | pair | cos @ {a} | cos @ {b} | Δ cos | rel. error @ {a} | "
            f"rel. error @ {b} | Δ rel. error | gate @ {a} | gate @ {b} |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['pair']} | {r[f'cos@{a}']:.3f} | {r[f'cos@{b}']:.3f} | "
            f"{_fmt_ci(r['cos_diff'])} | {r[f'rel_err@{a}']:.3f} | {r[f'rel_err@{b}']:.3f} | "
            f"{_fmt_ci(r['rel_err_diff'])} | {r[f'gate@{a}']:.3f} | {r[f'gate@{b}']:.3f} |"
        )
    per_seed = ", ".join(
        f"seed {s}: {100 * acc[a][s]:.2f}% / {100 * acc[b][s]:.2f}%"
        for s in seeds
        if s in acc.get(b, {})
    )
    lines += [
        "",
        (
            f"Final test accuracy, {key} = {b} minus {a}: {_fmt_ci(acc_diff)} pp "
            f"(seeds {seeds}; {a} / {b}: {per_seed})."
        ),
        "",
    ]
    (out / "GC_ODE_MATCHING.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu-cifar10", choices=("cpu-fmnist", "cpu-cifar10"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--compare",
        default="model.gc_ode.sobolev_weight=0,1",
        help="KEY=A,B: the one setting the two arms differ in",
    )
    parser.add_argument("--steps", type=int, help="training steps (default: the suite's 100%% run)")
    parser.add_argument("--probe-batches", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    key, sep, values = args.compare.partition("=")
    arms = tuple(v.strip() for v in values.split(","))
    if not sep or not key.strip() or len(arms) != 2 or not all(arms) or arms[0] == arms[1]:
        parser.error(f"--compare must be KEY=A,B with two different values, got {args.compare!r}")
    key = key.strip()
    try:  # both arms must be valid configurations before anything runs
        for value in arms:
            arm_config(args.suite, 0, (key, value))
    except ConfigError as err:
        parser.error(f"--compare {args.compare!r}: {err}")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        for value in arms:
            runs.append(run_one(args.suite, seed, (key, value), args.steps, args.probe_batches))
            elapsed = time.perf_counter() - t0
            print(f"seed {seed} {key}={value} done ({elapsed:.0f} s)", flush=True)
    cfg = load_config(suites()[args.suite].base_config, list(suites()[args.suite].overrides))
    meta = {
        "suite": args.suite,
        "seeds": seeds,
        "compare": key,
        "arms": list(arms),
        "probe_batches": args.probe_batches,
        "batch_size": cfg.data.batch_size,
        "command": "python -m experiments.studies.gc_ode_matching "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": describe_machine(machine()),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "wall_s": time.perf_counter() - t0,
    }
    out = args.out or ROOT / "results" / "gc_ode_matching" / args.suite
    write_outputs(out, runs, summarize(runs, arms), meta)
    print((out / "GC_ODE_MATCHING.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
