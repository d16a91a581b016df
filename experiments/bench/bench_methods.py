"""Per-step cost of every method of a comparison suite, measured alone on the machine.

    python -m experiments.bench.bench_methods --suite cpu-fmnist              # 3 rounds x 10 steps
    python -m experiments.bench.bench_methods --suite cpu-fmnist --rounds 1 --steps 2   # smoke run

The suites run many short training processes, and their in-run step times
are disturbed by whatever else the machine does (on our 2-core CPU, the other
suite ran at the same time). This benchmark gives the clean figure the
wall-clock savings use: one process builds every method's trainer exactly as
the suite's 100% run (``experiments.suites.compare`` overrides, real data, the
jitted train step with its guard and metrics), compiles it with two untimed
steps, then times ``--steps`` consecutive steps per method in ``--rounds``
rounds, the method order rotated each round so slow drifts of the machine
spread over all methods. Each step is timed to the host-side read of its
metrics (the step has finished). Reports the median step time per method and
its ratio to the baseline's.

Writes ``experiments/results/<suite>/overhead.json`` and ``overhead.md``
(command, machine, date); ``experiments.suites.report`` uses them when present.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gcgd_jax.ops import apply_cpu_flags

apply_cpu_flags()

import numpy as np

from experiments.common.provenance import describe_machine, machine
from experiments.suites.compare import RESULTS, SUITES
from gcgd_jax.train import Trainer, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu-fmnist", choices=sorted(SUITES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument(
        "--methods", help="comma-separated subset (default: every method of the suite)"
    )
    parser.add_argument("--out", type=Path, help="folder (default experiments/results/<suite>)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")

    suite = SUITES[args.suite]
    methods = list(dict.fromkeys(m for m, _, _ in suite.grid()))
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            parser.error(f"unknown method(s) {unknown}; the suite has: {', '.join(methods)}")
        methods = [m for m in methods if m in wanted]
    if "baseline" not in methods:
        methods.insert(0, "baseline")

    t0 = time.perf_counter()
    trainers: dict[str, Trainer] = {}
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            cfg = load_config(suite.base_config, [*suite.overrides_for(m), "log.progress=false"])
            tr = Trainer(cfg, out_dir=Path(tmp) / m, stream=io.StringIO())
            bs = cfg.data.batch_size
            rng = np.random.default_rng(0)
            idx = [
                rng.choice(len(tr.train_ds.labels), bs, replace=False) for _ in range(args.steps)
            ]
            # (replicas, batch, ...): one replica
            batches[m] = [(tr.train_ds.images[i][None], tr.train_ds.labels[i][None]) for i in idx]
            for images, labels in batches[m][:2]:  # compile + one more untimed step
                tr.train_step(images, labels)
            trainers[m] = tr
            print(f"built {m} ({time.perf_counter() - t0:.0f} s)", flush=True)

        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                tr = trainers[m]
                for images, labels in batches[m]:
                    s = time.perf_counter()
                    tr.train_step(images, labels)
                    times[m].append(time.perf_counter() - s)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    base = statistics.median(times["baseline"])
    results = {
        m: {
            "step_s_median": statistics.median(t),
            "step_s_min": min(t),
            "ratio": statistics.median(t) / base,
            "n": len(t),
        }
        for m, t in times.items()
    }
    meta = {
        "suite": args.suite,
        "command": "python -m experiments.bench.bench_methods "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": describe_machine(machine()),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "steps": args.steps,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out = args.out or RESULTS / args.suite
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(
        json.dumps({"meta": meta, "methods": results}, indent=2) + "\n"
    )
    lines = [
        f"# Per-step cost, suite {args.suite} (measured alone)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}.",
        "",
        (
            f"Median of {args.rounds} rounds × {args.steps} steps of each method's jitted train step "
            "(suite configuration of the 100% run; protocol in `experiments/bench/bench_methods.py`)."
        ),
        "",
        "| method | median step (s) | fastest step (s) | ratio to baseline |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {r['step_s_median']:.4f} | {r['step_s_min']:.4f} | {r['ratio']:.3f}× |"
        for m, r in results.items()
    ]
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
