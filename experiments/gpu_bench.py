"""Train-step speed and memory on an accelerator: ResNet-20 and ResNet-18, with and without GCGD.

Each case runs in its own process (so ``peak_bytes_in_use`` is its own), through the
training system's jitted step (``Trainer.dispatch``) on a synthetic batch already on the
device: ResNet-20 on 32x32x3 at batch 128 (the CIFAR setting), ResNet-18 (small stem) on
32x32x3 at batch 256. GCGD = GC-W (its defaults) + GC-ODE in gradient mode. Reports the
median step time over ``--steps`` steps after ``--warmup``, images/s and the device's peak
memory, with the device named. Used by ``experiments/gpu_check.sh``.

    python experiments/gpu_bench.py --out experiments/results/gpu_check
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "resnet20": ("resnet20", 128, ()),
    "resnet20_gcgd": ("resnet20", 128, ("corrections.chain=gc_w", "model.gc_ode=gradient")),
    "resnet18": ("resnet18", 256, ("model.small_stem=true",)),
    "resnet18_gcgd": (
        "resnet18",
        256,
        ("model.small_stem=true", "corrections.chain=gc_w", "model.gc_ode=gradient"),
    ),
}


def _one(case: str, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from gcgd_jax.train import Trainer, load_config

    model, batch, extra = CASES[case]
    cfg = load_config(
        "cifar10_resnet20",
        [f"model.name={model}", f"data.batch_size={batch}", "data.name=synthetic",
         f"data.synthetic_train_size={2 * batch}", "checkpoint.enabled=false",
         "log.progress=false", *extra],
    )  # fmt: skip
    t = Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="gpu_bench_"), stream=io.StringIO())
    images, labels = next(iter(t.batches(0)))
    x, y = t.put_batch(images), t.put_batch(labels)
    t0 = time.perf_counter()
    jax.block_until_ready(t.dispatch(x, y))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(t.dispatch(x, y))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(t.dispatch(x, y))
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    med = statistics.median(times)
    return {
        "case": case,
        "model": model,
        "batch": batch,
        "parameters": t.num_params,
        "device": f"{device.platform}: {device.device_kind}",
        "first_step_s": compile_s,
        "step_s_median": med,
        "step_s_min": min(times),
        "images_per_s": batch / med,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "jax": jax.__version__,
        "np": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check")
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_one(args.case, args.steps, args.warmup)))
        return 0
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            rows.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    record = {
        "command": " ".join(["python", "experiments/gpu_bench.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Train-step speed and memory on the accelerator",
        "",
        f"- command: `{record['command']}`; date {record['date']}",
        "",
        "| case | device | batch | parameters | first step s | step ms (median) | img/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error']} | | | | | | |")
            continue
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "n/a"
        lines.append(
            f"| {r['case']} | {r['device']} | {r['batch']} | {r['parameters']:,} | "
            f"{r['first_step_s']:.1f} | {1e3 * r['step_s_median']:.2f} | {r['images_per_s']:.0f} | {peak} |"
        )
    (args.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
