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
rounds (``experiments.common.timing.alternate``), the method order rotated each
round so slow drifts of the machine spread over all methods. Each step is timed to the host-side read of its
metrics (the step has finished). Reports the median step time per method and
its ratio to the baseline's.

Writes ``experiments/results/<suite>/overhead.json`` and ``overhead.md``
(command, machine, date and commit); ``experiments.suites.report`` uses them when
present.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from gcgd_jax.ops import apply_cpu_flags

apply_cpu_flags()

import numpy as np

from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import alternate, summary, timed
from experiments.suites.compare import RESULTS, suites
from gcgd_jax.train import Trainer, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu-fmnist", choices=sorted(suites()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument(
        "--methods", help="comma-separated subset (default: every method of the suite)"
    )
    parser.add_argument("--out", type=Path, help="folder (default experiments/results/<suite>)")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")

    suite = suites()[args.suite]
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

        def measure(_: int, m: str) -> list[float]:
            """The method's ``--steps`` batches, each step timed to the host-side read of its
            metrics (``Trainer.train_step`` returns them: the step has finished)."""
            tr, steps = trainers[m], iter(batches[m])
            return timed(lambda: tr.train_step(*next(steps)), len(batches[m]))

        times = alternate(methods, args.rounds, measure)

    results = step_costs(times)
    meta = {
        "suite": args.suite,
        "command": command("experiments.bench.bench_methods", argv_used),
        "machine": describe_machine(machine()),
        "date": utc_now(),
        "commit": git_commit(),
        "rounds": args.rounds,
        "steps": args.steps,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    record = {"meta": meta, "methods": results}
    text = _markdown(record)
    write(args.out or RESULTS / args.suite, "overhead", record, text)
    print(text)
    return 0


def step_costs(times: dict[str, list[float]]) -> dict[str, dict]:
    """``overhead.json``'s ``methods``: each method's pooled step times summarised
    (``experiments.common.timing.summary``), with its median's ``ratio`` to the baseline's
    (what ``experiments.suites.report.clean_step_costs`` reads)."""
    base = summary(times["baseline"])["step_s_median"]
    out = {}
    for m, t in times.items():
        s = summary(t)
        out[m] = {
            "step_s_median": s["step_s_median"],
            "step_s_min": s["step_s_min"],
            "step_s_max": s["step_s_max"],
            "ratio": s["step_s_median"] / base,
            "n": s["n"],
        }
    return out


def _markdown(record: dict) -> str:
    """``overhead.md``: the per-method table of an ``overhead.json`` record."""
    meta, results = record["meta"], record["methods"]
    commit = f"; commit {meta['commit']}" if meta.get("commit") else ""
    lines = [
        f"# Per-step cost, suite {meta['suite']} (measured alone)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; date {meta['date']}{commit}.",
        "",
        (
            f"Median of {meta['rounds']} rounds × {meta['steps']} steps of each method's jitted "
            "train step (suite configuration of the 100% run; protocol in "
            "`experiments/bench/bench_methods.py`)."
        ),
        "",
        "| method | median step (s) | fastest step (s) | ratio to baseline |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {r['step_s_median']:.4f} | {r['step_s_min']:.4f} | {r['ratio']:.3f}× |"
        for m, r in results.items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
