"""Choose a suite's base learning rate on a validation split (the baseline only).

For each learning rate of the grid and each seed, the suite's baseline is
trained at the full budget with ``data.val_fraction`` of the training set held
out (``data.eval_split=val``) and its final validation accuracy read; the
learning rate with the highest mean validation accuracy over seeds is chosen.
The test split is never read. The chosen value is what the suite's base
configuration should carry (``optim.lr`` in ``gcgd_jax/configs/<base>.toml``)
for every method.

Usage::

    python -m experiments.suites.lr_sweep --suite cpu-fmnist                # lr in {0.05, 0.1, 0.2, 0.4}, 2 seeds
    python -m experiments.suites.lr_sweep --suite cpu-fmnist --lrs 0.1,0.2 --seeds 3

Writes ``experiments/results/lr_sweep/<suite>/{sweep.json,SWEEP.md}`` and keeps
each run's metrics under ``lr<value>/runs/`` (finished runs are skipped on a re-run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

from experiments.common.provenance import describe_machine
from experiments.suites.compare import (
    RESULTS,
    dirty_tree_error,
    is_complete,
    run_dir,
    run_one,
    suites,
    tree,
    with_overrides,
)
from gcgd_jax.train.report import read_metrics

DEFAULT_LRS = (0.05, 0.1, 0.2, 0.4)
# The test split is never read: no final test evaluation either.
VAL_OVERRIDES = ("data.val_fraction=0.1", "data.eval_split=val", "train.final_test=false")


def choose(val_acc: dict[float, list[float]]) -> float:
    """The learning rate with the highest mean validation accuracy (ties: the smaller lr)."""
    if not val_acc or any(not v for v in val_acc.values()):
        raise ValueError("every learning rate needs at least one finished run")
    return max(sorted(val_acc), key=lambda lr: (float(np.mean(val_acc[lr])), -lr))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, choices=sorted(suites()))
    parser.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are first-seed, first-seed + 1, ... (tuning seeds apart from report seeds)",
    )
    parser.add_argument("--allow-dirty", action="store_true", help="see experiments.suites.compare")
    parser.add_argument("--out", type=Path, help="default experiments/results/lr_sweep/<suite>")
    args = parser.parse_args(argv)
    try:
        lrs = tuple(float(x) for x in args.lrs.split(","))
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if any(lr <= 0 for lr in lrs) or args.seeds < 1 or args.first_seed < 0:
        parser.error("learning rates must be > 0, --seeds >= 1 and --first-seed >= 0")
    base = suites()[args.suite]
    dirty = dirty_tree_error(base)
    if dirty and not args.allow_dirty:
        parser.error(dirty)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    out = args.out or RESULTS / "lr_sweep" / args.suite
    full = max(base.budgets)
    val_acc: dict[float, list[float]] = {}
    runs = []
    for seed in seeds:  # seed-major: a partial sweep stays balanced
        for lr in lrs:
            suite = with_overrides(base, (*VAL_OVERRIDES, f"optim.lr={lr:g}"))
            lr_out = out / f"lr{lr:g}"
            directory = run_dir(lr_out, "baseline", full, seed)
            if not is_complete(directory):
                print(f"lr={lr:g} seed={seed} ...", flush=True)
                rec = run_one(suite, "baseline", full, seed, lr_out)
                if rec["exit_code"] != 0:
                    print(
                        f"run failed (exit {rec['exit_code']}): {directory}/train.log",
                        file=sys.stderr,
                    )
                    return 1
    for lr in lrs:
        for seed in seeds:
            metrics = run_dir(out / f"lr{lr:g}", "baseline", full, seed) / "metrics.jsonl"
            summary = read_metrics(metrics)[-1]  # finished: ends with its summary
            acc = float(summary["final_val_acc"])
            val_acc.setdefault(lr, []).append(acc)
            runs.append({"lr": lr, "seed": seed, "final_val_acc": acc})
    chosen = choose(val_acc)
    command = "python -m experiments.suites.lr_sweep " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    record = {
        "suite": args.suite,
        "base_config": base.base_config,
        "overrides": [*base.overrides, *VAL_OVERRIDES],
        "lrs": list(lrs),
        "seeds": list(seeds),
        "commit": tree()["commit"],
        "clean_tree": tree()["clean"],
        "runs": runs,
        "mean_val_acc": {f"{lr:g}": float(np.mean(v)) for lr, v in val_acc.items()},
        "chosen_lr": chosen,
        "command": command,
        "machine": describe_machine(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(
        f"| {lr:g} | {' / '.join(f'{100 * a:.2f}' for a in val_acc[lr])} | {100 * np.mean(val_acc[lr]):.2f} |"
        + (" **chosen** |" if lr == chosen else " |")
        for lr in lrs
    )
    edge = chosen in (min(lrs), max(lrs))
    (out / "SWEEP.md").write_text(
        f"# Base learning-rate sweep: {args.suite} (baseline, validation split)\n\n"
        f"Baseline of `{base.base_config}` at the full budget, {args.seeds} seeds per learning rate "
        f"({', '.join(map(str, seeds))}), "
        "trained on the suite's training subset drawn from 90% of the training split and "
        "evaluated on the suite's evaluation-subset size taken from the other 10% "
        f"(`{' '.join(VAL_OVERRIDES)}`); the test split is not read. Chosen: the highest mean "
        "validation accuracy"
        f"{' (at the edge of the grid: extend the grid past it)' if edge else ''}.\n\n"
        "| lr | final val acc per seed (%) | mean (%) | |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Command: `{command}`; machine: {record['machine']}; date: {record['date']}; "
        f"commit {record['commit']}{'' if record['clean_tree'] else ' (tracked changes)'}.\n"
    )
    print(f"chosen lr = {chosen:g} (mean val acc {100 * np.mean(val_acc[chosen]):.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
