"""Overhead of the gradient transforms: one jitted optimizer update, with and without.

For each transform ``tx`` in :data:`TRANSFORMS` this times one jitted call of

    updates, state = optax.chain(tx, optax.sgd(0.1, momentum=0.9)).update(g, state, p)
    p = optax.apply_updates(p, updates)

against the same call with ``optax.sgd(0.1, momentum=0.9)`` alone, on parameter
trees shaped like a CIFAR ResNet-20 (0.27M parameters) and an ImageNet
ResNet-18 (11.7M), built by hand here (Flax layout, no model code needed).
Variants are timed in alternation (``--rounds`` rounds, ``--reps`` calls each
per round, every call timed on its own and blocked until ready) and the
median per-call time is reported, in microseconds and as the ratio to the
``sgd`` baseline.

When ``gcgd_jax.models.resnet20`` can be imported it also times a full
ResNet-20 train step at batch 128 (forward, backward, BatchNorm statistics,
``sgd`` update; split/merge around ``jax.jit``, the fusion breaker on) and
reports, per transform, ``(step + transform cost) / step`` where the transform
cost is the median difference measured on the ResNet-20 parameter tree. With
``--direct`` it also runs the full step with each transform chained in and
reports the directly measured ratio (noisier: the difference is small next to
the step). Without the model the section is recorded as skipped.

Usage::

    python -m experiments.bench.bench_transforms            # full settings
    python -m experiments.bench.bench_transforms --quick    # a smoke run (seconds)

Writes ``experiments/results/bench_transforms/{name}.json`` and ``.md`` with
the exact command, machine (processor, cores, devices, jax version), XLA flags,
date and commit. Only numbers from a quiet machine are results: a
``--quick`` run is marked as a smoke test.

To add a transform, add an entry to :data:`TRANSFORMS`: a name and a callable
``params -> GradientTransformation`` (it gets the parameter tree, e.g. to build
an ``optax.masked`` mask).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the CPU convolution flag, before JAX starts
    try:
        from gcgd_jax.ops import apply_cpu_flags

        apply_cpu_flags()
    except ImportError:  # pragma: no cover - training package not there
        pass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import RESULTS
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import alternate, summary, timed
from gcgd_jax.transforms.agr import agr
from gcgd_jax.transforms.centralize import centralize
from gcgd_jax.transforms.channel_directed import channel_directed
from gcgd_jax.transforms.gc_w import gc_w
from gcgd_jax.transforms.gc_w_v2 import gc_w_v2
from gcgd_jax.transforms.grokfast_ema import grokfast_ema
from gcgd_jax.transforms.mars_correction import mars_correction
from gcgd_jax.transforms.znorm import znorm

OUT_DIR = RESULTS / "bench_transforms"

#: name -> (params -> transform). Chained before ``optax.sgd(0.1, momentum=0.9)``.
TRANSFORMS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "centralize": lambda params: centralize(),
    "centralize_conv_only": lambda params: centralize(conv_only=True),
    "channel_directed_h0": lambda params: channel_directed("h0"),
    "channel_directed_sobolev": lambda params: channel_directed("sobolev"),
    "znorm": lambda params: znorm(),
    "agr": lambda params: agr(),
    "gc_w_pre_downsampling": lambda params: optax.masked(gc_w(), pre_downsampling_kernels(params)),
    "gc_w_all_kernels": lambda params: optax.masked(
        gc_w(), jax.tree.map(lambda x: x.ndim >= 2, params)
    ),
    "gc_w_v2_pre_downsampling": lambda params: optax.masked(
        gc_w_v2(), pre_downsampling_kernels(params)
    ),
    # v2 passes non-kernel leaves through: every kernel without a mask.
    "gc_w_v2_all_kernels": lambda params: gc_w_v2(),
    "mars_correction": lambda params: mars_correction(),
    "grokfast_ema": lambda params: grokfast_ema(),
}

_BLOCK_CONV2 = re.compile(r"stage\D*?(\d+).*?block\D*?(\d+).*conv2.*kernel")


def pre_downsampling_kernels(params: Any) -> Any:
    """Mask of the kernel before each down-sampling (last block's ``conv2`` of every stage),
    found by path, for both the hand-built trees and ``nnx.state(resnet20(...), nnx.Param)``.
    The same kernels as :func:`gcgd_jax.models.pre_downsampling_mask` (checked in the script)."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    last_block: dict[str, int] = {}
    for path in paths:
        if m := _BLOCK_CONV2.search(path):
            last_block[m.group(1)] = max(last_block.get(m.group(1), -1), int(m.group(2)))

    def selected(path: Any, _: Any) -> bool:
        m = _BLOCK_CONV2.search(jax.tree_util.keystr(path))
        return bool(m) and last_block[m.group(1)] == int(m.group(2))

    mask = jax.tree_util.tree_map_with_path(selected, params)
    n = sum(jax.tree.leaves(mask))
    if n not in (3, 4):
        raise RuntimeError(f"pre-down-sampling mask selected {n} kernels, expected 3 or 4")
    return mask


BASELINE = "sgd"


def base_optimizer() -> optax.GradientTransformation:
    return optax.sgd(0.1, momentum=0.9)


# ----------------------------------------------------------------------------
# Parameter trees (shapes only; Flax layout)
# ----------------------------------------------------------------------------


def _bn(c: int) -> dict:
    return {"scale": (c,), "bias": (c,)}


def _basic_block(cin: int, c: int, projection: bool) -> dict:
    block = {
        "conv1": {"kernel": (3, 3, cin, c)},
        "bn1": _bn(c),
        "conv2": {"kernel": (3, 3, c, c)},
        "bn2": _bn(c),
    }
    if projection:
        block["proj"] = {"kernel": (1, 1, cin, c)}
        block["proj_bn"] = _bn(c)
    return block


def resnet20_shapes(num_classes: int = 10) -> dict:
    """CIFAR ResNet-20: 3x3 stem 3->16, 3 stages x 3 basic blocks (16/32/64), option-A
    shortcuts (no parameters), BatchNorm scale/bias, dense 64->10: 269,722 parameters."""
    tree = {"stem": {"conv": {"kernel": (3, 3, 3, 16)}, "bn": _bn(16)}}
    cin = 16
    for s, c in enumerate((16, 32, 64)):
        for b in range(3):
            tree[f"stage{s}_block{b}"] = _basic_block(cin, c, projection=False)
            cin = c
    tree["head"] = {"kernel": (64, num_classes), "bias": (num_classes,)}
    return tree


def resnet18_shapes(num_classes: int = 1000) -> dict:
    """ImageNet ResNet-18: 7x7 stem 3->64, 4 stages x 2 basic blocks (64..512), 1x1
    projection + BatchNorm where the shape changes, dense 512->1000: 11,689,512 parameters."""
    tree = {"stem": {"conv": {"kernel": (7, 7, 3, 64)}, "bn": _bn(64)}}
    cin = 64
    for s, c in enumerate((64, 128, 256, 512)):
        for b in range(2):
            tree[f"stage{s}_block{b}"] = _basic_block(cin, c, projection=cin != c)
            cin = c
    tree["head"] = {"kernel": (512, num_classes), "bias": (num_classes,)}
    return tree


PARAM_TREES: Mapping[str, Callable[[], dict]] = {
    "resnet20_tree": resnet20_shapes,
    "resnet18_tree": resnet18_shapes,
}


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def materialise(shapes: dict, seed: int) -> Any:
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [0.05 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
    )


def count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def time_alternating(
    calls: Mapping[str, Callable[[], Any]], *, rounds: int, reps: int
) -> dict[str, list[float]]:
    """Per-call wall times (seconds), every call blocked until ready: two untimed calls of
    each variant (compilation), then ``reps`` timed calls of each per round, side by side
    (:func:`~experiments.common.timing.alternate`)."""

    def blocking(call: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: jax.block_until_ready(call())

    runs = {name: blocking(call) for name, call in calls.items()}
    for run in runs.values():  # compile and warm up
        timed(run, 2)
    return alternate(list(runs), rounds, lambda _, name: timed(runs[name], reps), progress=False)


def _summary(ts: list[float]) -> dict[str, float]:
    s = summary(ts)
    return {
        "median_us": 1e6 * s["step_s_median"],
        "min_us": 1e6 * s["step_s_min"],
        "max_us": 1e6 * s["step_s_max"],
        "n": s["n"],
    }


def bench_update(
    shapes: dict, transforms: Mapping[str, Callable], *, rounds: int, reps: int
) -> dict:
    """Median time of one jitted ``chain(tx, sgd)`` update vs ``sgd`` on a params tree."""
    params, grads = materialise(shapes, 0), materialise(shapes, 1)
    calls: dict[str, Callable[[], Any]] = {}
    for name, make in {BASELINE: None, **transforms}.items():
        tx = base_optimizer() if make is None else optax.chain(make(params), base_optimizer())
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        jstep = jax.jit(step)
        # The state is threaded through the calls so stateful transforms (GC-W)
        # pay their periodic work (its predictor step every `window` calls).
        carry = {"s": state}

        def call(jstep=jstep, carry=carry):
            p, carry["s"] = jstep(params, carry["s"], grads)
            return p

        calls[name] = call
    times = time_alternating(calls, rounds=rounds, reps=reps)
    summaries = {name: _summary(ts) for name, ts in times.items()}
    base = summaries[BASELINE]["median_us"]
    rows = {}
    for name, s in summaries.items():
        med = s["median_us"]
        rows[name] = {**s, "ratio_to_sgd": med / base, "extra_us": med - base}
    return {"num_params": count(params), "num_leaves": len(jax.tree.leaves(params)), "rows": rows}


def bench_resnet20_step(
    transforms: Mapping[str, Callable], *, rounds: int, reps: int, batch: int, direct: bool
) -> dict:
    """Full ResNet-20 train step at ``batch`` (baseline; with ``direct`` every transform too)."""
    try:
        from flax import nnx

        from gcgd_jax.models import resnet20
    except ImportError as err:
        return {"skipped": f"gcgd_jax.models.resnet20 not importable: {err}"}

    model = resnet20(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
    breaker = jnp.float32(1.0)  # runtime 1.0: the fusion breaker (docs/cpu_performance.md)

    def loss_fn(params, rest, x, y, breaker):
        m = nnx.merge(graphdef, params, rest, copy=True)
        logits = m(x, fusion_breaker=breaker)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.state(m, nnx.Not(nnx.Param))  # updated BatchNorm statistics

    variants = {BASELINE: None, **(transforms if direct else {})}
    calls = {}
    for name, make in variants.items():
        tx = base_optimizer() if make is None else optax.chain(make(params), base_optimizer())
        opt_state = tx.init(params)

        def step(params, rest, opt_state, x, y, breaker, tx=tx):
            (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, rest, x, y, breaker
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, loss

        jstep = jax.jit(step)
        carry = {"o": opt_state}

        def call(jstep=jstep, carry=carry):
            _, _, carry["o"], loss = jstep(params, rest, carry["o"], images, labels, breaker)
            return loss

        calls[name] = call
    times = time_alternating(calls, rounds=rounds, reps=reps)
    out = {
        "batch": batch,
        "num_params": count(params),
        "rows": {name: _summary(ts) for name, ts in times.items()},
    }
    base = out["rows"][BASELINE]["median_us"]
    for name in variants:
        if name != BASELINE:
            out["rows"][name]["ratio_direct"] = out["rows"][name]["median_us"] / base
    return out


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def environment(argv: list[str]) -> dict:
    return {
        "command": command("experiments.bench.bench_transforms", argv),
        "date_utc": utc_now(),
        "machine": machine(),
        "optax": optax.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "commit": git_commit(),
    }


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    m = env.get("machine", env)  # older records: the machine's keys in the environment
    lines = [f"# Transform overhead ({'QUICK SMOKE RUN' if s['quick'] else 'full run'})", ""]
    if s["quick"]:
        lines += [
            (
                "**`--quick`: few repetitions, possibly on a shared, busy machine. A smoke "
                "test of the script, not a measurement; do not quote these numbers.**"
            ),
            "",
        ]
    lines += [
        f"- command: `{env['command']}`",
        f"- date (UTC): {env['date_utc']}",
        f"- code: commit {env.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(m)}",
        (f"- jaxlib {m['jaxlib']}, optax {env['optax']}, XLA_FLAGS={env['XLA_FLAGS']!r}"),
        (
            f"- timing: {s['rounds']} alternating rounds x {s['reps']} calls per variant, "
            "median per call; baseline `optax.sgd(0.1, momentum=0.9)`, each transform "
            "chained before it; parameters and gradients float32"
        ),
        "",
    ]
    for tree_name, res in result["update"].items():
        lines += [
            (
                f"## One jitted update on a {tree_name} ({res['num_params']:,} parameters, "
                f"{res['num_leaves']} leaves)"
            ),
            "",
            "| variant | median µs | min µs | max µs | extra µs vs sgd | ratio to sgd |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in res["rows"].items():
            lines.append(
                f"| {name} | {r['median_us']:.1f} | {r['min_us']:.1f} | {r['max_us']:.1f} | "
                f"{r['extra_us']:.1f} | {r['ratio_to_sgd']:.2f} |"
            )
        lines.append("")
    full = result["resnet20_step"]
    lines += ["## ResNet-20 full train step", ""]
    if "skipped" in full:
        lines += [f"Skipped: {full['skipped']}", ""]
    else:
        base = full["rows"][BASELINE]
        lines += [
            (
                f"Baseline step (batch {full['batch']}, {full['num_params']:,} parameters): "
                f"median {base['median_us'] / 1e3:.1f} ms (min {base['min_us'] / 1e3:.1f}, "
                f"max {base['max_us'] / 1e3:.1f}, n={base['n']})."
            ),
            "",
            "Estimated ratio = (step + transform cost on the ResNet-20 tree) / step.",
            "",
            "| transform | extra µs (tree) | (step + extra) / step | direct ratio |",
            "|---|---:|---:|---:|",
        ]
        for name, est in full["estimated"].items():
            direct = full["rows"].get(name, {}).get("ratio_direct")
            lines.append(
                f"| {name} | {est['extra_us']:.1f} | {est['ratio']:.4f} | "
                f"{'-' if direct is None else f'{direct:.3f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per round")
    parser.add_argument("--step-rounds", type=int, default=None)
    parser.add_argument("--step-reps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the full ResNet-20 step with every transform (default: on unless --quick)",
    )
    parser.add_argument("--trees", nargs="+", default=list(PARAM_TREES), choices=list(PARAM_TREES))
    parser.add_argument("--only", nargs="+", default=list(TRANSFORMS), choices=list(TRANSFORMS))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--name", default=None, help="output file stem (default: full / quick)")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)

    q = args.quick
    settings = {
        "quick": q,
        "rounds": args.rounds or (3 if q else 20),
        "reps": args.reps or (10 if q else 50),
        "step_rounds": args.step_rounds or (2 if q else 5),
        "step_reps": args.step_reps or (3 if q else 10),
        "batch": args.batch,
        "direct": (not q) if args.direct is None else args.direct,
        "trees": args.trees,
        "transforms": args.only,
    }
    transforms = {name: TRANSFORMS[name] for name in args.only}
    result: dict = {"environment": environment(argv_used), "settings": settings, "update": {}}
    for tree_name in args.trees:
        print(f"[bench] {tree_name} ...", flush=True)
        result["update"][tree_name] = bench_update(
            PARAM_TREES[tree_name](), transforms, rounds=settings["rounds"], reps=settings["reps"]
        )
    print("[bench] resnet20 full train step ...", flush=True)
    full = bench_resnet20_step(
        transforms,
        rounds=settings["step_rounds"],
        reps=settings["step_reps"],
        batch=settings["batch"],
        direct=settings["direct"],
    )
    if "skipped" not in full:
        base_us = full["rows"][BASELINE]["median_us"]
        tree = result["update"].get("resnet20_tree") or bench_update(
            resnet20_shapes(), transforms, rounds=settings["rounds"], reps=settings["reps"]
        )
        full["estimated"] = {
            name: {
                "extra_us": tree["rows"][name]["extra_us"],
                "ratio": (base_us + tree["rows"][name]["extra_us"]) / base_us,
            }
            for name in transforms
        }
    result["resnet20_step"] = full

    stem = args.name or ("quick" if q else "full")
    write(args.out, stem, result, markdown(result))
    print(markdown(result))
    print(f"[bench] wrote {args.out / (stem + '.json')} and .md")
    return result


if __name__ == "__main__":
    main()
