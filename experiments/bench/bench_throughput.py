"""Throughput of the ResNet-20 / CIFAR-10 train step: our pipeline vs a bare jitted step.

Pipelines (batch 128, SGD momentum 0.9, weight decay 1e-4, one device):

* ``loop``      -- the training loop of ``gcgd-train`` (config ``cifar10_resnet20``):
  real CIFAR-10 from ``gcgd_jax.data`` batched on the host, moved to the device,
  augmented (crop + flip) and normalised inside the jitted step, the
  non-finite guard, metrics read back one step behind.
* ``resident``  -- the same jitted train step fed one batch already on the device
  (``loop`` / ``resident`` shows what the input pipeline costs).
* ``bare``      -- a minimal ``jax.jit`` step on the same model: normalised float32
  batch already on the device, cross-entropy, ``optax.sgd`` + weight decay, no
  augmentation, guard or metrics.

Each pipeline runs with the XLA CPU flag (``gcgd_jax.ops``) on or off
and the fusion breaker on or off. XLA reads its flags once per process, so two
worker processes (flag on / off) each build every pipeline, and the parent asks
them for measurements in alternating rounds (configuration order rotated each
round); per-step times are pooled over rounds and the median is reported.
Results go to ``experiments/results/bench_throughput/`` as JSON and Markdown, with the
command, machine, versions and date.

    python -m experiments.bench.bench_throughput            # 4 rounds x 12 timed steps
    python -m experiments.bench.bench_throughput --quick    # 2 rounds x 3 steps (a smoke run)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

from experiments import REPO
from experiments import RESULTS as RESULTS_ROOT
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import Worker, alternate, serve, summary

RESULTS = RESULTS_ROOT / "bench_throughput"
PIPELINES = ("loop", "resident", "bare")
BATCH = 128


# --------------------------------------------------------------------------- worker


def _worker(data_dir: str | None) -> None:
    """Reads ``{"pipeline", "fusion_breaker", "steps"}`` lines; answers with step times."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gcgd_jax.data import normalization
    from gcgd_jax.models import resnet20
    from gcgd_jax.train import Trainer, load_config

    built: dict = {}

    def trainer_for(fb: bool):
        key = ("trainer", fb)
        if key not in built:
            overrides = [
                f"run.fusion_breaker={'on' if fb else 'off'}",
                "checkpoint.enabled=false",
                "log.progress=false",
                f"data.batch_size={BATCH}",
            ]
            if data_dir:
                overrides.append(f"data.data_dir={data_dir}")
            cfg = load_config("cifar10_resnet20", overrides)
            trainer = Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="bench_"), stream=io.StringIO())
            images = trainer.train_ds.images[:BATCH][None]  # (replicas, batch, ...): one
            labels = trainer.train_ds.labels[:BATCH][None]
            resident = (trainer.put_batch(images), trainer.put_batch(labels))
            built[key] = {"trainer": trainer, "step": 0, "resident": resident}
        return built[key]

    def bare_for(fb: bool):
        key = ("bare", fb)
        if key not in built:
            t = trainer_for(False)["trainer"]  # only for its data
            mean, std = normalization("cifar10")
            x = jnp.asarray((t.train_ds.images[:BATCH] / 255.0 - mean) / std, jnp.float32)
            y = jnp.asarray(t.train_ds.labels[:BATCH])
            model = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
            model.train()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

            def step(params, rest, opt_state, x, y, breaker):
                def loss_fn(params):
                    m = nnx.merge(graphdef, params, rest, copy=True)
                    logits = m(x, fusion_breaker=breaker if fb else None)
                    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                    return loss, nnx.state(m, nnx.Not(nnx.Param))

                (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), rest, opt_state, loss

            built[key] = {
                "fn": jax.jit(step, donate_argnums=(0, 1, 2)),
                "state": (params, rest, tx.init(params)),
                "batch": (x, y),
                "fb": jnp.float32(1.0),
            }
        return built[key]

    def pipelined(run_one, steps: int) -> list[float]:
        """Completion-to-completion times, each step dispatched before the previous is read."""
        times, last, pending = [], None, None
        for _ in range(steps + 1):
            out = run_one()
            if pending is not None:
                jax.block_until_ready(pending)
                now = time.perf_counter()
                if last is not None:
                    times.append(now - last)
                last = now
            pending = out
        jax.block_until_ready(pending)
        times.append(time.perf_counter() - last)
        return times

    def measure(pipeline: str, fb: bool, steps: int) -> list[float]:
        if pipeline == "bare":
            b = bare_for(fb)

            def run_one():
                *state, loss = b["fn"](*b["state"], *b["batch"], b["fb"])
                b["state"] = tuple(state)
                return loss

            return pipelined(run_one, steps)
        entry = trainer_for(fb)
        trainer = entry["trainer"]
        if pipeline == "resident":
            x, y = entry["resident"]

            def run_one():
                return trainer.dispatch(x, y)["loss"]

            return pipelined(run_one, steps)
        # The real loop (its per-step completion-to-completion times, first step excluded).
        spe = trainer.steps_per_epoch
        step = entry["step"]
        if (step % spe) + steps + 1 > spe:
            step = (step // spe + 1) * spe
        times = trainer.train_epoch(step // spe, step, step + steps + 1).step_times
        entry["step"] = step + steps + 1
        return times

    def answer(cmd: dict) -> dict:
        if cmd.get("warmup", 0):
            measure(cmd["pipeline"], cmd["fusion_breaker"], cmd["warmup"])  # compile + settle
        return {"times": measure(cmd["pipeline"], cmd["fusion_breaker"], cmd["steps"])}

    serve(answer)


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after building")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    if args.worker:
        _worker(args.data_dir)
        return 0
    n_rounds = args.rounds or (2 if args.quick else 4)
    steps = args.steps or (3 if args.quick else 12)
    warmup = 1 if args.quick else args.warmup
    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = set(pipelines) - set(PIPELINES)
    if unknown:
        parser.error(f"unknown pipeline(s) {sorted(unknown)}; known: {', '.join(PIPELINES)}")

    from gcgd_jax.ops import CPU_CONV_FLAG

    workers = {}
    for flag in (True, False):
        env = dict(os.environ, XLA_FLAGS=CPU_CONV_FLAG if flag else "", JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "experiments.bench.bench_throughput", "--worker"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        workers[flag] = Worker(f"flag {'on' if flag else 'off'}", cmd, cwd=REPO, env=env)
    configs = [(p, flag, fb) for p in pipelines for flag in (True, False) for fb in (True, False)]

    def measure(r: int, config: tuple) -> list[float]:
        pipeline, flag, fb = config
        request = {"pipeline": pipeline, "fusion_breaker": fb, "steps": steps}
        return workers[flag].ask({**request, "warmup": warmup if r == 0 else 0})["times"]

    def describe(config: tuple) -> str:
        pipeline, flag, fb = config
        return f"{pipeline:8s} flag={'on ' if flag else 'off'} fb={'on ' if fb else 'off'}"

    started = time.time()
    try:
        times = alternate(configs, n_rounds, measure, describe=describe)
    finally:
        for w in workers.values():
            w.close()

    rows = [
        {"pipeline": pipeline, "xla_flag": flag, "fusion_breaker": fb, **summary(ts, BATCH)}
        for (pipeline, flag, fb), ts in times.items()
    ]
    record = {
        "command": command("experiments.bench.bench_throughput", argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine(),
        "batch_size": BATCH,
        "rounds": n_rounds,
        "steps_per_round": steps,
        "wall_s": time.time() - started,
        "xla_flag": CPU_CONV_FLAG,
        "quick": args.quick,
        "results": rows,
    }
    stem = "throughput_quick" if args.quick else "bench_throughput"
    write(args.out, stem, record, _markdown(record))
    print(_markdown(record))
    return 0


def _markdown(rec: dict) -> str:
    m = rec["machine"]
    lines = [
        "# ResNet-20 / CIFAR-10 train-step throughput",
        "",
        *(["**Smoke run (--quick): too few steps to quote.**", ""] if rec.get("quick") else []),
        f"- command: `{rec['command']}`",
        f"- date: {rec['date']}; wall time {rec['wall_s']:.0f} s; commit {rec.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(m)}, jaxlib {m['jaxlib']}",
        (
            f"- batch {rec['batch_size']}, {rec['rounds']} alternating rounds x {rec['steps_per_round']} "
            "timed steps per configuration; per-step times pooled over rounds"
        ),
        f"- XLA flag: `{rec['xla_flag']}`",
        "",
        "| pipeline | XLA flag | fusion breaker | step s (min / median / max) | img/s at median |",
        "|---|---|---|---|---|",
    ]
    for r in rec["results"]:
        lines.append(
            f"| {r['pipeline']} | {'on' if r['xla_flag'] else 'off'} | {'on' if r['fusion_breaker'] else 'off'} "
            f"| {r['step_s_min']:.3f} / {r['step_s_median']:.3f} / {r['step_s_max']:.3f} "
            f"| {r['images_per_s']:.0f} |"
        )
    med = {
        (r["pipeline"], r["xla_flag"], r["fusion_breaker"]): r["step_s_median"]
        for r in rec["results"]
    }
    lines += ["", "Ratios of medians (flag on, fusion breaker on):", ""]
    if ("loop", True, True) in med and ("resident", True, True) in med:
        lines.append(
            f"- input pipeline: loop / resident = {med[('loop', True, True)] / med[('resident', True, True)]:.3f}"
        )
    if ("loop", True, True) in med and ("bare", True, True) in med:
        lines.append(
            f"- whole pipeline: loop / bare = {med[('loop', True, True)] / med[('bare', True, True)]:.3f}"
        )
    if ("loop", False, False) in med and ("loop", True, True) in med:
        lines.append(
            f"- loop, defaults / flag + breaker = {med[('loop', False, False)] / med[('loop', True, True)]:.3f}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
