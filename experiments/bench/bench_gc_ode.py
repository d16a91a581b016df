"""GC-ODE overhead: ResNet-20 train-step and inference time relative to the plain model.

Train step: SGD with momentum (lr 0.1, 0.9), batch 128 of 32x32x3 (random data),
softmax cross-entropy + ``aux["gc_ode_loss"]``, ``jax.jit`` over the
``nnx.split`` state (graphdef static), the fusion breaker passed as a runtime
argument (``jnp.float32(1.0)``), and on the CPU the convolution flag from
``docs/cpu_performance.md`` (set here unless ``XLA_FLAGS`` is already set).

Configurations: the plain ResNet-20, and ResNet-20 with GC-ODE in each mode
("gradient", "branch") with Euler/Heun and 1, 2, 4 fixed steps at the shipped
defaults (the unrolled solve, ``adjoint="auto"``); for comparison diffrax's
``diffeqsolve`` with ``adjoint="direct"`` (one Euler step per mode) and with
``"recursive_checkpoint"`` (``/checkpoint``: gradient mode Euler 1 and Heun 2,
branch mode Euler 1), the branch's backward-matching term
(``sobolev_weight=1``), the output loss on every example or every 2nd
(``loss_subsample`` 1, 2: ``/sub1``, ``/sub2``; the default is 4); and the
controls ``scale_only`` and ``frozen_branch`` (one Euler step). They run
alternately in rounds (machine noise is large); per-step times are pooled and
medians reported, with the ratio to the plain model's median. Inference: eval
mode, batch 128, plain vs gradient mode (branch skipped).

Usage::

    python -m experiments.bench.bench_gc_ode            # full grid, 4 rounds x 8 steps
    python -m experiments.bench.bench_gc_ode --quick    # plain + 3 GC-ODE configs, 2 rounds x 3 steps
    python -m experiments.bench.bench_gc_ode --only plain,gradient/euler/1,gradient/euler/1/sub1 --name sub

Writes ``experiments/results/bench_gc_ode/<name>.json`` and ``.md``
(``name`` = ``bench_gc_ode``, ``gc_ode_overhead_quick`` or ``--name``).
"""

from __future__ import annotations

import os

from experiments import RESULTS as RESULTS_ROOT
from gcgd_jax.ops import apply_cpu_flags

apply_cpu_flags()  # the CLI's CPU flag, before JAX starts (unless XLA_FLAGS is set)

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import alternate, summary, timed
from gcgd_jax.models import GCODEConfig, resnet20

RESULTS = RESULTS_ROOT / "bench_gc_ode"


def _configs(quick: bool) -> dict[str, GCODEConfig | None]:
    """Name ``mode/solver/steps[/direct|/checkpoint|/sobolev|/sub<k>]`` -> config
    (``None``: the plain ResNet-20); names without a suffix are the shipped defaults."""
    configs: dict[str, GCODEConfig | None] = {"plain": None}
    if quick:
        grid = [("gradient", "euler", 1), ("gradient", "heun", 1), ("branch", "euler", 1)]
    else:
        grid = [
            (m, s, n) for m in ("gradient", "branch") for s in ("euler", "heun") for n in (1, 2, 4)
        ]
    for mode, solver, steps in grid:
        configs[f"{mode}/{solver}/{steps}"] = GCODEConfig(mode=mode, solver=solver, steps=steps)
    if not quick:  # diffrax's adjoint without recomputation, for comparison
        for mode in ("gradient", "branch"):
            configs[f"{mode}/euler/1/direct"] = GCODEConfig(mode=mode, adjoint="direct")
        # diffrax's diffeqsolve with its recursive-checkpoint adjoint (the default until
        # the unrolled solve, adjoint="auto"), for comparison.
        for mode, solver, steps in (("gradient", "euler", 1), ("gradient", "heun", 2),
                                    ("branch", "euler", 1)):  # fmt: skip
            configs[f"{mode}/{solver}/{steps}/checkpoint"] = GCODEConfig(
                mode=mode, solver=solver, steps=steps, adjoint="recursive_checkpoint"
            )
        configs["gradient/euler/1/sobolev"] = GCODEConfig(mode="gradient", sobolev_weight=1.0)
        for k in (1, 2):  # the branch's output loss on every k-th example (default 4)
            configs[f"gradient/euler/1/sub{k}"] = GCODEConfig(mode="gradient", loss_subsample=k)
    # The controls of the default: no branch (gradient rescaled only), a frozen branch.
    configs["scale_only"] = GCODEConfig(mode="scale_only", control_scale=1.0)
    configs["frozen_branch/euler/1"] = GCODEConfig(mode="frozen_branch")
    return configs


def _train_step_fn(model, tx, use_breaker: bool):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)  # plain arrays across the jit boundary

    @jax.jit
    def step(params, rest, opt_state, x, y, breaker):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, rest)
            logits, aux = m(x, return_aux=True, fusion_breaker=breaker if use_breaker else None)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            _, _, new_rest = nnx.split(m, nnx.Param, ...)
            return loss + aux["gc_ode_loss"], nnx.as_pure(new_rest)

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    return step, params, rest


class _Train:
    def __init__(self, config, batch, use_breaker):
        model = resnet20(gc_ode=config, rngs=nnx.Rngs(0))
        model.train()
        self.tx = optax.sgd(0.1, momentum=0.9)
        self.step, self.params, self.rest = _train_step_fn(model, self.tx, use_breaker)
        self.opt_state = self.tx.init(self.params)
        rng = np.random.default_rng(0)
        self.x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
        self.y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
        self.breaker = jnp.float32(1.0)

    def __call__(self):
        self.params, self.rest, self.opt_state, loss = self.step(
            self.params, self.rest, self.opt_state, self.x, self.y, self.breaker
        )
        loss.block_until_ready()


class _Infer:
    def __init__(self, config, batch):
        model = resnet20(gc_ode=config, rngs=nnx.Rngs(0))
        model.eval()
        graphdef, state = nnx.split(model)
        state = nnx.as_pure(state)
        self.fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        self.state = state
        rng = np.random.default_rng(1)
        self.x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))

    def __call__(self):
        self.fn(self.state, self.x).block_until_ready()


def _timed_rounds(runners: dict, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Warms every runner up (``warmup`` untimed calls, compilation included), then times
    ``steps`` calls of each per round, side by side (:func:`alternate`)."""
    for name, run in runners.items():
        print(f"  warm-up {name}: {sum(timed(run, warmup)):.1f} s (incl. compile)", flush=True)
    return alternate(list(runners), rounds, lambda _, name: timed(runners[name], steps))


def _summary(times: dict[str, list[float]], batch: int) -> dict:
    """Each configuration's :func:`summary`, in this benchmark's record fields, with its
    median's ratio to the plain model's."""
    base = summary(times["plain"])["step_s_median"]
    out = {}
    for name, t in times.items():
        s = summary(t, batch)
        out[name] = {
            "min_s": s["step_s_min"],
            "median_s": s["step_s_median"],
            "max_s": s["step_s_max"],
            "n": s["n"],
            "img_per_s": s["images_per_s"],
            "ratio_to_plain": s["step_s_median"] / base,
        }
    return out


def _markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    described = (
        f"{describe_machine(m)}, load at start {m.get('load_avg', m.get('load_avg_at_start'))}"
    )
    versions = f"jax {v['jax']}, flax {v['flax']}, diffrax {v['diffrax']}, optax {v['optax']}"
    protocol = (
        f"batch {result['batch']}, 32x32x3, SGD momentum; {result['rounds']} alternating "
        f"rounds x {result['steps_per_round']} timed steps per configuration"
    )
    lines = [
        f"# GC-ODE overhead on ResNet-20 ({'quick' if result['quick'] else 'full'} run)",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; commit {result.get('commit')}",
        f"- machine: {described}",
        f"- {versions}",
        f"- XLA_FLAGS: `{result['xla_flags']}`; fusion breaker: {result['fusion_breaker']}",
        f"- {protocol}",
        "",
        "## Train step",
        "",
        "| configuration (mode/solver/steps) | step s (min / median / max) | img/s | x plain |",
        "|---|---|---|---|",
    ]
    for name, s in result["train"].items():
        lines.append(
            f"| {name} | {s['min_s']:.3f} / {s['median_s']:.3f} / {s['max_s']:.3f} | "
            f"{s['img_per_s']:.0f} | {s['ratio_to_plain']:.3f} |"
        )
    lines += [
        "",
        "## Inference (eval mode; gradient mode skips the branch)",
        "",
        "| configuration | forward s (min / median / max) | img/s | x plain |",
        "|---|---|---|---|",
    ]
    for name, s in result["inference"].items():
        lines.append(
            f"| {name} | {s['min_s']:.4f} / {s['median_s']:.4f} / {s['max_s']:.4f} | "
            f"{s['img_per_s']:.0f} | {s['ratio_to_plain']:.3f} |"
        )
    if result["quick"]:
        lines += [
            "",
            (
                "Quick run: few samples on a possibly shared machine -- a smoke test of the "
                "script, not a measurement to quote."
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few configurations, few steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-fusion-breaker", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--only", help="comma-separated configuration names (of the full grid)")
    parser.add_argument("--name", help="results file name (default: by --quick)")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 8)
    use_breaker = not args.no_fusion_breaker

    configs = _configs(args.quick)
    if args.only:
        wanted = args.only.split(",")
        full = _configs(False)
        unknown = [n for n in wanted if n not in full]
        if unknown or "plain" not in wanted:
            parser.error(f"--only needs 'plain' and names from {sorted(full)}; unknown: {unknown}")
        configs = {n: full[n] for n in wanted}
    print(f"train step, {len(configs)} configurations", flush=True)
    train = {n: _Train(c, args.batch, use_breaker) for n, c in configs.items()}
    train_times = _timed_rounds(train, rounds, steps, args.warmup)
    del train
    print("inference", flush=True)
    infer = {
        "plain": _Infer(None, args.batch),
        "gradient (branch skipped)": _Infer(GCODEConfig(mode="gradient"), args.batch),
    }
    infer_times = _timed_rounds(infer, rounds, steps, args.warmup)

    import diffrax
    import flax

    result = {
        "command": command("experiments.bench.bench_gc_ode", argv_used),
        "date": utc_now(),
        "machine": machine(),
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "diffrax": diffrax.__version__,
            "optax": optax.__version__,
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "fusion_breaker": use_breaker,
        "quick": args.quick,
        "commit": git_commit(),
        "batch": args.batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "train": _summary(train_times, args.batch),
        "inference": _summary(infer_times, args.batch),
        "raw_times_s": {"train": train_times, "inference": infer_times},
    }
    name = args.name or ("gc_ode_overhead_quick" if args.quick else "bench_gc_ode")
    write(args.out, name, result, _markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
