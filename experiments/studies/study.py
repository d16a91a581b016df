"""A pre-registered study: a grid of runs of one of the package's CLIs, run in chunks.

A study is a TOML file (``experiments/studies/<name>.toml``): its description, its
pre-registration (endpoint, settings and sanity checks written before any run),
``variants`` (label -> command-line overrides), ``benchmarks`` and ``[[grid]]`` phases
(``variants``, ``seeds``). Optional: ``base`` (overrides every run gets before its
variant's) and ``[tuning]``: ``lrs``, ``seeds``, ``overrides`` (e.g. a validation split)
and ``variants``; a tuned variant's runs in the grid take the learning rate whose
tuning runs have the highest mean final validation accuracy (ties: the smaller one; a
tuning run stopped by a non-finite loss counts 0), so the choice is made before, and
apart from, any test number.

Every run is one process of the study's CLI (``gcgd-train`` or ``gcgd-continual``,
chosen by the script that runs the study), writing ``metrics.jsonl``, ``config.toml`` and
its checkpoints into ``<out>/runs/<benchmark>/<label>/s<seed>/`` (tuning runs:
``<out>/runs/tune/<benchmark>/<label>/lr<lr>/s<seed>/``); the runner adds ``run.json``
(command, exit code, wall time, peak RSS, machine, GPU and load, commit; the records of
the run's earlier, interrupted processes under ``earlier``). A run whose
``metrics.jsonl`` ends with its summary is skipped; an interrupted one is resumed from
its checkpoint. Runs go in order: tuning, then phase by phase, seed by seed, every
benchmark, every variant (a finished seed is a complete paired block). The study is
refused from a checkout with uncommitted changes (``--allow-dirty`` for trials); a copy
of a checkout without ``.git`` (the lent GPU machine's) runs when ``GCGD_COMMIT`` names
the commit it is a copy of.

``--deadline UNIX_SECONDS`` ends a chunk in time (the GPU machine's lease): no run starts
after it, and a run still going then is stopped (SIGTERM, SIGKILL ``GRACE_S`` later) and
recorded as interrupted (``"interrupted": true`` in its ``run.json``); the chunk then ends
with exit 0, and the next one resumes that run from its last epoch checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from experiments import ROOT
from experiments.common.provenance import checkout_state, describe_machine, machine
from gcgd_jax.train.report import read_metrics

_REQUIRED = {
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
_OPTIONAL = {"base", "tuning"}
TUNING_PHASE = 0
GRACE_S = 10.0  # from SIGTERM at the deadline to SIGKILL


class Cell(NamedTuple):
    """One run of the grid: phase (0 = tuning, then 1-based), benchmark, seed, variant
    label and, for a tuning run, its learning rate."""

    phase: int
    benchmark: str
    seed: int
    label: str
    lr: float | None = None


@dataclass(frozen=True)
class Tuning:
    """``[tuning]``: each of ``variants`` is trained at every ``lrs`` on ``seeds`` with
    ``overrides`` (a validation split; the test split is not read)."""

    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    """A study's definition (module docstring)."""

    name: str
    description: str
    paper_setting: str
    expected_time: str
    require_clean: bool
    benchmarks: tuple[str, ...]
    preregistration: str
    variants: dict[str, tuple[str, ...]]  # label -> overrides
    phases: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (labels, seeds) per phase
    base: tuple[str, ...] = ()
    tuning: Tuning | None = None

    def cells(self, phase: int | None = None) -> list[Cell]:
        """The runs in order (``phase``: only that one; 0 is the tuning)."""
        out = []
        if self.tuning is not None and phase in (None, TUNING_PHASE):
            t = self.tuning
            out += [
                Cell(TUNING_PHASE, b, s, v, lr)
                for s in t.seeds
                for b in self.benchmarks
                for v in t.variants
                for lr in t.lrs
            ]
        for p, (labels, seeds) in enumerate(self.phases, 1):
            if phase is None or p == phase:
                out += [Cell(p, b, s, v) for s in seeds for b in self.benchmarks for v in labels]
        return out


def _seeds(value: int | list[int]) -> tuple[int, ...]:
    return tuple(range(value)) if isinstance(value, int) else tuple(value)


def load_study(path: Path) -> Study:
    """Reads a study definition; ``ValueError`` naming the file and the problem."""
    raw = tomllib.loads(Path(path).read_text())
    if not _REQUIRED <= set(raw) <= _REQUIRED | _OPTIONAL:
        raise ValueError(
            f"{path}: expected the keys {sorted(_REQUIRED)} (and optionally {sorted(_OPTIONAL)})"
        )
    variants = {k: tuple(v) for k, v in raw["variants"].items()}
    phases = []
    for i, phase in enumerate(raw["grid"]):
        labels = tuple(phase["variants"])
        missing = [v for v in labels if v not in variants]
        if missing:
            raise ValueError(f"{path}: grid[{i}] names unknown variants {missing}")
        phases.append((labels, _seeds(phase["seeds"])))
    tuning = None
    if "tuning" in raw:
        t = raw["tuning"]
        tuning = Tuning(
            lrs=tuple(float(lr) for lr in t["lrs"]),
            seeds=_seeds(t["seeds"]),
            overrides=tuple(t["overrides"]),
            variants=tuple(t["variants"]),
        )
        missing = [v for v in tuning.variants if v not in variants]
        if missing:
            raise ValueError(f"{path}: tuning names unknown variants {missing}")
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
        base=tuple(raw.get("base", ())),
        tuning=tuning,
    )


def run_dir(out: Path | str, benchmark: str, label: str, seed: int, lr: float | None = None):
    """The folder of one run."""
    if lr is not None:
        return Path(out) / "runs" / "tune" / benchmark / label / f"lr{lr:g}" / f"s{seed}"
    return Path(out) / "runs" / benchmark / label / f"s{seed}"


def cell_dir(out: Path | str, cell: Cell) -> Path:
    return run_dir(out, cell.benchmark, cell.label, cell.seed, cell.lr)


def is_complete(directory: Path) -> bool:
    """Whether the run in ``directory`` finished (its metrics end with the summary)."""
    records = read_metrics(Path(directory) / "metrics.jsonl")
    return bool(records) and records[-1].get("kind") == "summary"


def final_val_acc(directory: Path) -> float | None:
    """A finished tuning run's score: its last validation accuracy (0 when a non-finite
    loss stopped it); None while it has not finished."""
    records = read_metrics(Path(directory) / "metrics.jsonl")
    if not records or records[-1].get("kind") != "summary":
        return None
    if records[-1].get("status") == "nonfinite":
        return 0.0
    epochs = [r for r in records if r.get("kind") == "epoch" and r.get("val_acc") is not None]
    return float(epochs[-1]["val_acc"]) if epochs else 0.0


def tuned_lrs(study: Study, out: Path | str) -> dict[tuple[str, str], float | None]:
    """``(benchmark, variant) -> learning rate`` chosen by the tuning runs (module
    docstring); None for a variant whose tuning is not finished."""
    chosen: dict[tuple[str, str], float | None] = {}
    if study.tuning is None:
        return chosen
    t = study.tuning
    for benchmark in study.benchmarks:
        for label in t.variants:
            means = {}
            for lr in t.lrs:
                scores = [final_val_acc(run_dir(out, benchmark, label, s, lr)) for s in t.seeds]
                means[lr] = None if None in scores else float(np.mean(scores))
            done = all(m is not None for m in means.values())
            # highest mean; ties go to the smaller learning rate
            chosen[benchmark, label] = min(t.lrs, key=lambda lr: (-means[lr], lr)) if done else None
    return chosen


def overrides(study: Study, cell: Cell, out: Path | str, benchmark_key: str) -> tuple[str, ...]:
    """The overrides of one run: base, variant, tuning or tuned learning rate, benchmark,
    seed and name. ``ValueError`` for a tuned variant whose tuning has not finished."""
    tuned: tuple[str, ...] = ()
    if cell.lr is not None:
        assert study.tuning is not None
        tuned = (*study.tuning.overrides, f"optim.lr={cell.lr:g}")
        name = f"{study.name}/tune/{cell.benchmark}/{cell.label}/lr{cell.lr:g}/s{cell.seed}"
    else:
        name = f"{study.name}/{cell.benchmark}/{cell.label}/s{cell.seed}"
        if study.tuning is not None and cell.label in study.tuning.variants:
            lr = tuned_lrs(study, out)[cell.benchmark, cell.label]
            if lr is None:
                raise ValueError(
                    f"{cell.label} on {cell.benchmark}: its learning-rate tuning has not "
                    "finished (run the tuning phase first)"
                )
            tuned = (f"optim.lr={lr:g}",)
    return (
        *study.base,
        *study.variants[cell.label],
        *tuned,
        f"{benchmark_key}={cell.benchmark}",
        f"run.seed={cell.seed}",
        f"run.name={name}",
    )


@functools.cache
def _tree() -> dict:
    return checkout_state(ROOT.parent)


@functools.cache
def _gpu() -> str | None:
    """The GPUs ``nvidia-smi`` lists (name, memory, driver), one line; None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    found = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    return "; ".join(found.strip().splitlines()) or None


def _wait(pid: int, deadline: float | None) -> tuple[int, int, bool]:
    """Waits for the child ``pid``: ``(wait status, peak RSS in KiB, interrupted)``. At
    ``deadline`` (Unix seconds) it is sent SIGTERM, and SIGKILL ``GRACE_S`` later."""
    kill_at = None
    while True:
        done, status, usage = os.wait4(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return status, usage.ru_maxrss, kill_at is not None
        assert deadline is not None
        now = time.time()
        if kill_at is None and now >= deadline:
            os.kill(pid, signal.SIGTERM)
            kill_at = now + GRACE_S
        elif kill_at is not None and now >= kill_at:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@dataclass(frozen=True)
class Runner:
    """How a study's runs are started: the CLI module and the key its benchmark sets."""

    cli: str  # e.g. "gcgd_jax.train.cli", run as python -m <cli>
    benchmark_key: str  # e.g. "data.name", "tasks.benchmark"
    quiet: tuple[str, ...] = ("--quiet",)  # the CLI's flag for no progress display

    def command(self, study: Study, cell: Cell, out: Path | str, directory: Path) -> list[str]:
        cmd = [sys.executable, "-m", self.cli, "--out", str(directory), *self.quiet]
        for o in overrides(study, cell, out, self.benchmark_key):
            cmd += ["--set", o]
        return cmd

    def run_one(
        self, study: Study, cell: Cell, out: Path | str, extra=(), deadline: float | None = None
    ) -> dict:
        """Runs (or resumes) one cell in its own process, stopped at ``deadline`` (Unix
        seconds; module docstring); writes and returns its ``run.json``."""
        directory = cell_dir(out, cell)
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [*self.command(study, cell, out, directory), *extra]
        # An earlier process of this run: continue from its newest checkpoint (or, with
        # none, start again; the CLI says which in run.log).
        if (directory / "checkpoints").exists() or (directory / "metrics.jsonl").exists():
            cmd.append("--resume")
        earlier_path = directory / "run.json"
        earlier = json.loads(earlier_path.read_text()) if earlier_path.exists() else None
        t0 = time.perf_counter()
        with open(directory / "run.log", "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT.parent)
            status, peak_kib, interrupted = _wait(proc.pid, deadline)
        info = machine(with_jax=False)
        record = {
            "command": shlex.join(cmd),
            "exit_code": os.waitstatus_to_exitcode(status),
            "interrupted": interrupted,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mib": round(peak_kib / 1024, 1),  # Linux: KiB
            "machine": describe_machine(info),
            "gpu": _gpu(),
            "load_avg": info["load_avg"],
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "commit": _tree()["commit"],
            "commit_source": _tree()["commit_source"],
            "clean_tree": _tree()["clean"],
        }
        if earlier is not None:  # this run's earlier processes, oldest first
            record["earlier"] = [*earlier.pop("earlier", []), earlier]
        earlier_path.write_text(json.dumps(record, indent=2) + "\n")
        return record


def main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    study_path: Path,
    default_out: Path,
    runner: Runner,
    build_report: Callable[[Path, Study], Path],
    ok_exit_codes: tuple[int, ...] = (0,),
) -> int:
    """The command line of a study script (``--list``, ``--max-runs``, ``--phase``,
    ``--deadline``, ``--report-only``, ...). ``ok_exit_codes``: exit codes of a run that let
    the chunk go on (a study may count a diverged run as a result)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--max-runs", type=int, help="run at most this many unfinished runs")
    parser.add_argument(
        "--phase", type=int, help="only this phase of the grid (1-based; 0: the tuning)"
    )
    parser.add_argument("--list", action="store_true", help="print the grid and what is done")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument("--no-report", action="store_true", help="do not rebuild the report")
    parser.add_argument(
        "--out", type=Path, default=default_out, help=f"results folder (default {default_out})"
    )
    parser.add_argument("--data-dir", help="the data's folder (the CLI's --data-dir)")
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
    parser.add_argument(
        "--deadline",
        type=float,
        metavar="UNIX_SECONDS",
        help="start no run after this time and stop one still going then (it is recorded "
        "as interrupted and resumes from its last checkpoint in the next chunk)",
    )
    args = parser.parse_args(argv)
    study = load_study(study_path)
    cells = study.cells(args.phase)
    if args.list:
        for c in cells:
            done = "done" if is_complete(cell_dir(args.out, c)) else "-"
            lr = "" if c.lr is None else f" lr {c.lr:g}"
            print(f"phase {c.phase}  {c.benchmark:15s} s{c.seed}  {c.label + lr:34s} {done}")
        return 0
    if not args.report_only:
        dirty = study.require_clean and not _tree()["clean"]
        if dirty and not args.allow_dirty and _tree()["commit"] is None:
            parser.error(
                "the study runs from a clean checkout (run.json records its commit); this one "
                "has no .git: in a copy of a committed checkout (the GPU machine's), set "
                "GCGD_COMMIT to the commit it is a copy of; or pass --allow-dirty for a trial"
            )
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
        todo = [c for c in cells if not is_complete(cell_dir(args.out, c))]
        if args.max_runs is not None:
            todo = todo[: args.max_runs]
        for i, cell in enumerate(todo, 1):
            if args.deadline is not None and time.time() >= args.deadline:
                print(f"deadline: {len(todo) - i + 1} runs of this chunk not started", flush=True)
                break
            try:
                record = runner.run_one(study, cell, args.out, extra, args.deadline)
            except ValueError as err:
                print(f"stopped: {err}", file=sys.stderr)
                return 1
            lr = "" if cell.lr is None else f" lr {cell.lr:g}"
            stopped = ", interrupted at the deadline" if record["interrupted"] else ""
            print(
                f"[{i}/{len(todo)}] {cell.benchmark} {cell.label}{lr} s{cell.seed}: "
                f"exit {record['exit_code']}, {record['wall_s']:.0f} s{stopped}",
                flush=True,
            )
            if record["interrupted"]:
                print(f"deadline: {cell_dir(args.out, cell)} resumes in the next chunk")
                break
            if record["exit_code"] not in ok_exit_codes:
                print(f"stopped: the run failed; see {cell_dir(args.out, cell) / 'run.log'}",
                      file=sys.stderr)  # fmt: skip
                return 1
        left = sum(not is_complete(cell_dir(args.out, c)) for c in cells)
        print(f"{len(cells) - left} of {len(cells)} runs done")
    if not args.no_report:
        path = build_report(args.out, study)
        print(f"report: {path}")
    return 0


@dataclass(frozen=True)
class Script:
    """A study's script: its definition file, results folder, runner and report builder
    (``"module:function"``, imported when the report is built)."""

    prog: str
    description: str
    study_path: Path
    default_out: Path
    runner: Runner
    report: str
    ok_exit_codes: tuple[int, ...] = (0,)

    def load_study(self, path: Path | None = None) -> Study:
        """The study's definition (``path``: another file of the same shape)."""
        return load_study(self.study_path if path is None else path)

    def build_report(self, out: Path, study: Study) -> Path:
        module, _, function = self.report.partition(":")
        return getattr(importlib.import_module(module), function)(out, study)

    def main(self, argv: list[str] | None = None) -> int:
        return main(
            argv,
            prog=self.prog,
            description=self.description,
            study_path=self.study_path,
            default_out=self.default_out,
            runner=self.runner,
            build_report=self.build_report,
            ok_exit_codes=self.ok_exit_codes,
        )
