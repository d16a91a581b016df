"""Run the pre-registered continual-learning study (``continual_mnist.toml``) in chunks.

Usage::

    python -m experiments.studies.continual_mnist --list           # the grid and what is done
    python -m experiments.studies.continual_mnist --max-runs 4     # the next 4 unfinished runs
    python -m experiments.studies.continual_mnist --phase 1        # phase 1 only, to the end
    python -m experiments.studies.continual_mnist --report-only    # RESULTS.md from the runs

Every run is one ``gcgd-continual`` process (``python -m gcgd_jax.continual.cli``) writing
``metrics.jsonl``, ``config.toml`` and its checkpoints into
``experiments/results/continual_mnist/runs/<benchmark>/<label>/s<seed>/``; the runner adds
``run.json`` (command, exit code, wall time, peak RSS, machine and its load, commit). A
run whose ``metrics.jsonl`` ends with its summary is skipped; an interrupted one is
resumed from the checkpoint after its last finished task. So a session can run a few,
commit them, and the next one continues. Runs go in the grid's order: phase by phase,
seed by seed, both benchmarks, every variant (a finished seed is a complete paired block).
After a chunk the report is rebuilt (:mod:`experiments.studies.continual_report`).

The study is refused from a checkout with uncommitted changes (every ``run.json`` records
the commit it ran); ``--allow-dirty`` overrides that, for trials only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from experiments import RESULTS, ROOT
from experiments.common.provenance import describe_machine, machine, tree_state
from gcgd_jax.train.report import read_metrics

STUDY = ROOT / "studies" / "continual_mnist.toml"
OUT = RESULTS / "continual_mnist"
_KEYS = {
    "name",
    "description",
    "paper_setting",
    "expected_time",
    "require_clean",
    "benchmarks",
    "preregistration",
    "variants",
    "grid",
}


@dataclass(frozen=True)
class Study:
    """The study's definition (``continual_mnist.toml``)."""

    name: str
    description: str
    paper_setting: str
    expected_time: str
    require_clean: bool
    benchmarks: tuple[str, ...]
    preregistration: str
    variants: dict[str, tuple[str, ...]]  # label -> gcgd-continual overrides
    phases: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (labels, seeds) per phase

    def cells(self, phase: int | None = None) -> list[tuple[int, str, int, str]]:
        """``(phase, benchmark, seed, label)`` in run order (1-based phases)."""
        out = []
        for p, (labels, seeds) in enumerate(self.phases, 1):
            if phase is not None and p != phase:
                continue
            out += [(p, b, s, v) for s in seeds for b in self.benchmarks for v in labels]
        return out


def load_study(path: Path = STUDY) -> Study:
    """Reads a study definition; ``ValueError`` naming the file and the problem."""
    raw = tomllib.loads(Path(path).read_text())
    unknown = set(raw) - _KEYS
    if unknown or not set(raw) >= _KEYS:
        raise ValueError(f"{path}: expected exactly the keys {sorted(_KEYS)}")
    variants = {k: tuple(v) for k, v in raw["variants"].items()}
    phases = []
    for i, phase in enumerate(raw["grid"]):
        labels, seeds = tuple(phase["variants"]), phase["seeds"]
        missing = [v for v in labels if v not in variants]
        if missing:
            raise ValueError(f"{path}: grid[{i}] names unknown variants {missing}")
        phases.append((labels, tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)))
    return Study(
        name=raw["name"],
        description=raw["description"],
        paper_setting=raw["paper_setting"],
        expected_time=raw["expected_time"],
        require_clean=bool(raw["require_clean"]),
        benchmarks=tuple(raw["benchmarks"]),
        preregistration=raw["preregistration"].strip(),
        variants=variants,
        phases=tuple(phases),
    )


def run_dir(out: Path, benchmark: str, label: str, seed: int) -> Path:
    """The folder of one run."""
    return Path(out) / "runs" / benchmark / label / f"s{seed}"


def is_complete(directory: Path) -> bool:
    """Whether the run in ``directory`` finished (its metrics end with the summary)."""
    records = read_metrics(Path(directory) / "metrics.jsonl")
    return bool(records) and records[-1].get("kind") == "summary"


def command(study: Study, benchmark: str, label: str, seed: int, out: Path) -> list[str]:
    """The ``gcgd-continual`` command of one run."""
    overrides = (
        *study.variants[label],
        f"tasks.benchmark={benchmark}",
        f"run.seed={seed}",
        f"run.name={study.name}/{benchmark}/{label}/s{seed}",
    )
    cmd = [sys.executable, "-m", "gcgd_jax.continual.cli", "--out", str(out), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


@functools.cache
def _tree() -> dict:
    return tree_state(ROOT.parent)


def run_one(study: Study, benchmark: str, label: str, seed: int, out: Path, extra=()) -> dict:
    """Runs (or resumes) one cell in its own process; writes and returns its ``run.json``."""
    directory = run_dir(out, benchmark, label, seed)
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [*command(study, benchmark, label, seed, directory), *extra]
    if (directory / "checkpoints").exists():
        cmd.append("--resume")
    t0 = time.perf_counter()
    with open(directory / "run.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    info = machine(with_jax=False)
    record = {
        "command": shlex.join(cmd),
        "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "machine": describe_machine(info),
        "load_avg": info["load_avg"],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": _tree()["commit"],
        "clean_tree": _tree()["clean"],
    }
    (directory / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.studies.continual_mnist",
        description="The pre-registered continual-learning study, run in resumable chunks.",
    )
    parser.add_argument("--max-runs", type=int, help="run at most this many unfinished runs")
    parser.add_argument("--phase", type=int, help="only this phase of the grid (1-based)")
    parser.add_argument("--list", action="store_true", help="print the grid and what is done")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument("--no-report", action="store_true", help="do not rebuild the report")
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--data-dir", help="MNIST's IDX files (gcgd-continual --data-dir)")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an extra override for every run (trials only: the study's runs take none)",
    )
    parser.add_argument(
        "--allow-dirty", action="store_true", help="run from a checkout with uncommitted changes"
    )
    args = parser.parse_args(argv)
    study = load_study()
    cells = study.cells(args.phase)
    if args.list:
        for phase, benchmark, seed, label in cells:
            done = is_complete(run_dir(args.out, benchmark, label, seed))
            print(f"phase {phase}  {benchmark:15s} s{seed}  {label:34s} {'done' if done else '-'}")
        return 0
    if not args.report_only:
        dirty = study.require_clean and not _tree()["clean"]
        if dirty and not args.allow_dirty:
            changed = ", ".join(_tree()["changed"][:8])
            parser.error(
                f"the study runs from a clean checkout (run.json records its commit); this one "
                f"differs from {_tree()['commit']} in: {changed}. Commit the changes first, or "
                "pass --allow-dirty for a trial"
            )
        extra = [a for o in args.extra for a in ("--set", o)]
        if args.data_dir:
            extra += ["--data-dir", args.data_dir]
        todo = [c for c in cells if not is_complete(run_dir(args.out, c[1], c[3], c[2]))]
        if args.max_runs is not None:
            todo = todo[: args.max_runs]
        for i, (_, benchmark, seed, label) in enumerate(todo, 1):
            record = run_one(study, benchmark, label, seed, args.out, extra)
            print(
                f"[{i}/{len(todo)}] {benchmark} {label} s{seed}: exit {record['exit_code']}, "
                f"{record['wall_s']:.0f} s",
                flush=True,
            )
            if record["exit_code"] != 0:
                log = run_dir(args.out, benchmark, label, seed) / "run.log"
                print(f"stopped: the run failed; see {log}", file=sys.stderr)
                return 1
        left = sum(not is_complete(run_dir(args.out, c[1], c[3], c[2])) for c in cells)
        print(f"{len(cells) - left} of {len(cells)} runs done")
    if not args.no_report:
        from experiments.studies.continual_report import build_report

        path = build_report(args.out, study)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
