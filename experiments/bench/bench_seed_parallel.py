"""What a replica-step costs when N seeds train in one jitted step (``run.seeds``).

The ResNet-20 train step of the ``cifar10_resnet20`` configuration (batch 128,
32×32×3 synthetic images already on the device, augmentation, guard and
metrics inside the step, as in ``gcgd-train``) for N = 1 (a single run:
``Trainer``'s step) and N = 2, 4 replicas with each ``run.replica_strategy``
(``vmap``: batched over the replica axis; ``unroll``: one copy per replica).
Every variant is compiled first (the first-step time is reported), then timed
in alternating rounds (order rotated each round) in one process; per-step
times are pooled and the median reported, with the cost per replica-step
relative to the single run. Results: ``experiments/results/bench_seed_parallel/``.

    python -m experiments.bench.bench_seed_parallel                 # 4 rounds x 5 steps, N = 1, 2, 4
    python -m experiments.bench.bench_seed_parallel --quick         # a smoke run (tiny images)
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from experiments import RESULTS as RESULTS_ROOT
from experiments.common.results import command, utc_now, write
from experiments.common.timing import alternate, summary, timed

RESULTS = RESULTS_ROOT / "bench_seed_parallel"


def _variant(n: int, strategy: str, quick: bool):
    """``(step, first_step_seconds, batch)``: a no-argument function running one train
    step and waiting for it, the first step's time and the batch of one replica."""
    import jax

    from experiments.gpu_check import synthetic_overrides
    from gcgd_jax.train import Trainer, load_config

    overrides = [*synthetic_overrides(quick), "train.total_steps=100000"]
    if n > 1:  # one replica is a plain run (run.seed), whatever the strategy
        overrides += [f"run.seeds={list(range(n))}", f"run.replica_strategy={strategy}"]
    folder = tempfile.mkdtemp(prefix="bench_seed_parallel_")
    t = Trainer(load_config("cifar10_resnet20", overrides), out_dir=folder, stream=io.StringIO())
    images, labels = next(t.batches(0))  # (replicas, batch, ...)
    x, y = t.put_batch(images), t.put_batch(labels)

    def step():
        jax.block_until_ready(t.dispatch(x, y))

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0, t.cfg.data.batch_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--quick", action="store_true", help="tiny images, 2 rounds x 2 steps")
    p.add_argument("--out", type=Path, default=RESULTS)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv_used)
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()  # as gcgd-train does, before JAX starts
    from experiments.common.provenance import git_commit, machine

    rounds, steps = (2, 2) if a.quick else (a.rounds, a.steps)
    ns = [int(v) for v in a.replicas.split(",")]
    names = [(n, s) for n in ns for s in (("single",) if n == 1 else ("vmap", "unroll"))]
    built, first, batch = {}, {}, {}
    for n, s in names:
        built[(n, s)], first[(n, s)], batch[(n, s)] = _variant(n, s, a.quick)
        print(f"N={n} {s}: first step {first[(n, s)]:.1f} s", file=sys.stderr, flush=True)

    def measure(_: int, key: tuple) -> list[float]:
        built[key]()  # one untimed step after the switch
        return timed(built[key], steps)

    times = alternate(names, rounds, measure, describe=lambda k: f"N={k[0]} {k[1]}")
    rows = _rows(times, first, batch)
    record = {
        "command": command("experiments.bench.bench_seed_parallel", argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine(),
        "rounds": rounds,
        "steps_per_round": steps,
        "rows": rows,
    }
    text = _markdown(record)
    write(a.out, "bench_seed_parallel", record, text)
    print(text)
    return 0


def _rows(times: dict[tuple, list[float]], first: dict, batch: dict) -> list[dict]:
    """One row per ``(replicas, strategy)``: its :func:`summary` (images over every replica),
    first step, and cost per replica-step, also relative to the single run's."""
    single = summary(times[(1, "single")])["step_s_median"] if (1, "single") in times else None
    rows = []
    for (n, s), ts in times.items():
        stats = summary(ts, batch[(n, s)] * n)
        med = stats["step_s_median"]
        rows.append({
            "replicas": n, "strategy": s, "first_step_s": first[(n, s)], **stats,
            "per_replica_s": med / n, "per_replica_vs_single": (med / n) / single if single else None,
            "samples": stats["n"],
        })  # fmt: skip
    return rows


def _markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# Seed-parallel training: cost per replica-step (ResNet-20, batch 128)",
        "",
        f"- command: `{record['command']}`; {record['date']}; commit {record['commit']}",
        (
            f"- machine: {m['cpu']}, {m['cores']} cores; {m['device']}; Python {m['python']}, "
            f"jax {m['jax']}"
        ),
        (
            f"- {record['rounds']} alternating rounds x {record['steps_per_round']} timed steps "
            "per variant; medians"
        ),
        "",
        (
            "| replicas | strategy | first step s | step s (median) | s per replica-step "
            "| per replica-step vs one run |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        rel = f"{r['per_replica_vs_single']:.2f}x" if r["per_replica_vs_single"] else ""
        lines.append(
            f"| {r['replicas']} | {r['strategy']} | {r['first_step_s']:.1f} | "
            f"{r['step_s_median']:.3f} | {r['per_replica_s']:.3f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
