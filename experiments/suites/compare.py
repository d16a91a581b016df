"""Run a comparison suite (method × budget × seed) and build its report.

Usage::

    python -m experiments.suites.compare --suite cpu-fmnist            # the whole suite
    python -m experiments.suites.compare --suite cpu-fmnist --quick    # a tiny smoke version
    python -m experiments.suites.compare --suite cpu-fmnist --list     # print the grid
    python -m experiments.suites.compare --suite cpu-fmnist --report-only

Every run is one ``python -m gcgd_jax.train`` process (so each run's peak
memory is its own) writing ``metrics.jsonl``, its resolved ``config.toml`` and
checkpoints into ``<out>/runs/<method>/b<budget>/s<seed>/``; the runner adds
``run.json`` (command, wall time, peak RSS, exit code). A run whose
``metrics.jsonl`` already ends with its summary record is skipped, and an
interrupted run is resumed from its last checkpoint, so a long suite can be
stopped and restarted at will. The report (``RESULTS.md`` + PNG plots) is
rebuilt from whatever runs are complete.

Method definitions are configuration overrides on top of the suite's base
configuration (``gcgd_jax/configs/<base>.toml``), read from the method
registry (:mod:`gcgd_jax.methods`: a new registry entry is in every suite);
all hyperparameters are the documented defaults of each method (no tuning on
the test split).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments import RESULTS, ROOT
from experiments.common.provenance import describe_machine, tree_state
from experiments.suites.long_report import build_long_report
from experiments.suites.report import build_report, is_complete, run_dir
from gcgd_jax import methods as registry
from gcgd_jax.train.config import ConfigError, load_config
from gcgd_jax.train.report import read_metrics

# Method -> overrides of the base configuration: the optimizer alone, then every
# correction of the registry (gcgd_jax.methods) that gcgd-train runs, in registry order
# (the continual-learning methods run in gcgd-continual's task sequences instead:
# experiments.studies.continual_mnist; the gradient estimators replace backpropagation on
# the models that expose their activations, in their own study: #37).
METHODS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    **{
        m.name: m.select
        for m in registry.METHODS.values()
        if m.kind not in ("continual", "estimator")
    },
}
# GC-W's default warm-up (100 steps, window 10) assumes runs of thousands of
# steps; in the short CPU suites' 96-step runs it would never be applied. There the
# predictor trains every 4 steps and is applied from step 24 (a quarter of the
# 100% budget): those suites set this in their definition's [method_overrides].
# Controls matched to a measured run: the scale-only control rescales the gradient
# reaching every stage input by the mean gradient ratio (``gc_ode_grad_ratio``)
# that GC-ODE's gradient mode logged at the same budget and seed, so that it is
# the rescaling gradient mode applies, without the ODE branch.
MATCHED_SCALE = {"gc_ode_scale_only": "gc_ode_gradient"}


@functools.cache
def tree() -> dict:
    """The checkout the runs are made from (``commit``, ``clean``, ``changed``), read with git
    once per runner process, on first use, not at import (run.json records it)."""
    return tree_state(ROOT.parent)


SUITE_DIR = ROOT / "suites"  # one TOML definition per suite
REPORTS = ("budget-sweep", "long")


@dataclass(frozen=True)
class Phase:
    """One block of a suite's grid: every method at every budget for every seed, run
    seed-major (a suite cut short keeps its seeds balanced)."""

    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]

    def cells(self) -> list[tuple[str, float, int]]:
        return [(m, b, s) for s in self.seeds for b in self.budgets for m in self.methods]


@dataclass(frozen=True)
class Suite:
    """A comparison suite: a base configuration, the method × budget × seed grid as
    phases run in order, and the report that reads it (``experiments/suites/*.toml``)."""

    name: str
    base_config: str
    description: str
    phases: tuple[Phase, ...]
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # extra overrides per method, on top of METHODS (suite-specific settings)
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    paper_setting: str = ""
    expected_time: str = ""
    report: str = "budget-sweep"  # one of REPORTS
    # the pre-registered endpoint, written into RESULTS.md before any method runs
    preregistration: str = ""
    # runs refuse a checkout whose tracked files differ from its commit (unless --allow-dirty)
    require_clean: bool = False

    @property
    def budgets(self) -> tuple[float, ...]:
        return tuple(sorted({b for p in self.phases for b in p.budgets}))

    def overrides_for(self, method: str) -> tuple[str, ...]:
        return (*self.overrides, *METHODS[method], *self.method_overrides.get(method, ()))

    def grid(self) -> list[tuple[str, float, int]]:
        """Every cell once, in run order (phase by phase)."""
        return list(dict.fromkeys(c for p in self.phases for c in p.cells()))

    def with_seeds(self, n: int) -> Suite:
        """The suite with every phase running ``n`` seeds from its first one."""

        def first(p: Phase) -> int:
            return p.seeds[0] if p.seeds else 0

        phases = tuple(
            dataclasses.replace(p, seeds=tuple(range(first(p), first(p) + n))) for p in self.phases
        )
        return dataclasses.replace(self, phases=phases)


_SUITE_KEYS = {f.name for f in dataclasses.fields(Suite)} - {"phases"} | {"grid"}


def load_suite(path: Path) -> Suite:
    """Reads a suite definition; raises ``ValueError`` naming the file and the problem.

    ``[[grid]]`` tables are the phases: ``methods`` (a list of registry names, or
    ``"rest"``: every method not named by an earlier phase), ``budgets`` (a list),
    ``seeds`` (a count, from 0, or a list)."""
    import tomllib

    where = f"suite definition {path}"
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{where}: {err}") from None
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_SUITE_KEYS)}")
    phases, named = [], []
    for i, table in enumerate(raw.pop("grid", [])):
        bad = set(table) - {"methods", "budgets", "seeds"}
        if bad or not {"methods", "budgets", "seeds"} <= set(table):
            raise ValueError(f"{where}: grid[{i}] needs exactly methods, budgets, seeds")
        methods = table["methods"]
        if methods == "rest":
            methods = [m for m in METHODS if m not in named]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"{where}: grid[{i}]: unknown method(s) {unknown}")
        seeds = table["seeds"]
        seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
        named += methods
        phases.append(
            Phase(tuple(methods), tuple(float(b) for b in table["budgets"]), tuple(seeds))
        )
    if not phases:
        raise ValueError(f"{where}: no [[grid]] phase")
    report = raw.get("report", "budget-sweep")
    if report not in REPORTS:
        raise ValueError(f"{where}: report must be one of {REPORTS}, got {report!r}")
    overrides = raw.pop("method_overrides", {})
    unknown = set(overrides) - set(METHODS)
    if unknown:
        raise ValueError(f"{where}: method_overrides for unknown method(s) {sorted(unknown)}")
    return Suite(
        phases=tuple(phases),
        overrides=tuple(raw.pop("overrides", ())),
        method_overrides={m: tuple(v) for m, v in overrides.items()},
        **raw,
    )


@functools.cache
def suites() -> dict[str, Suite]:
    """Every suite definition of ``SUITE_DIR`` by name, read on first use (once per process),
    not at import."""
    return {s.name: s for s in (load_suite(p) for p in sorted(SUITE_DIR.glob("*.toml")))}


def dirty_tree_error(suite: Suite) -> str | None:
    """The error of running ``suite`` from this checkout: ``None`` unless the suite requires
    a clean checkout (``require_clean``) and this one is not."""
    if not suite.require_clean or tree()["clean"]:
        return None
    changed = ", ".join(tree()["changed"][:8]) + (" ..." if len(tree()["changed"]) > 8 else "")
    return (
        f"suite {suite.name} runs from a clean checkout (every run.json records its commit); "
        f"this one differs from {tree()['commit']} in: {changed}. Commit or stash the changes "
        "(or run from a worktree of the campaign's commit), or pass --allow-dirty"
    )


def quick(suite: Suite) -> Suite:
    """A tiny smoke version of a suite: a few hundred images, one seed, two budgets."""
    return Suite(
        name=f"{suite.name}-quick",
        base_config=suite.base_config,
        description=f"Smoke test of {suite.name}: tiny subsets; numbers are meaningless.",
        phases=(Phase(("baseline", "gc_w", "gcgd"), (0.5, 1.0), (0,)),),
        method_overrides=suite.method_overrides,
        report=suite.report,
        preregistration=suite.preregistration,
        overrides=(
            "data.train_subset=256",
            "data.test_subset=128",
            "data.batch_size=64",
            "train.epochs=2",
            "train.total_steps=none",
            "checkpoint.every_epochs=1",
        ),
    )


def matched_control_scale(out: Path, method: str, budget: float, seed: int) -> float:
    """The step-weighted mean ``gc_ode_grad_ratio`` of the finished run of ``method``.

    Raises ``RuntimeError`` naming the run when it is not complete or logged no ratio.
    """
    directory = run_dir(out, method, budget, seed)
    if not is_complete(directory):
        raise RuntimeError(
            f"the scale-only control replays the gradient ratio of {directory}, "
            "which has not finished: run it first (it comes earlier in the suite's grid)."
        )
    records = read_metrics(directory / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    total = weight = 0.0
    previous = 0
    for record in epochs:
        steps, previous = record["step"] - previous, record["step"]
        if record.get("gc_ode_grad_ratio") is not None and steps > 0:
            total += record["gc_ode_grad_ratio"] * steps
            weight += steps
    if not weight:
        raise RuntimeError(f"{directory} logged no gc_ode_grad_ratio (run before it was measured).")
    return total / weight


def with_overrides(suite: Suite, extra: tuple[str, ...]) -> Suite:
    """``suite`` with ``extra`` configuration overrides applied to every run."""
    return dataclasses.replace(suite, overrides=(*suite.overrides, *extra)) if extra else suite


def _train(cmd: list[str], directories: list[Path], resume: bool, note: str | None) -> dict:
    """Runs one ``gcgd-train`` process; writes each directory's ``run.json`` record."""
    if resume:
        cmd = [*cmd, "--resume"]
    t0 = time.perf_counter()
    with open(directories[0] / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    record = {
        "command": shlex.join(cmd),
        "exit_code": os.waitstatus_to_exitcode(status),
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "machine": describe_machine(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": tree()["commit"],
        "clean_tree": tree()["clean"],
    }
    if note:
        record["note"] = note
    for directory in directories:
        (directory / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _command(
    suite: Suite, directory: Path, method: str, budget: float, name: str, seeding: tuple[str, ...]
) -> list[str]:
    """The ``gcgd-train`` command of one cell (or seed-parallel group): the method's
    overrides, then ``seeding`` (the seed or seeds, a matched control scale), then the
    run's name and budget."""
    overrides = (
        *suite.overrides_for(method),
        *seeding,
        f"run.name={name}",
        f"train.budget={budget}",
        "log.progress=false",
    )
    cmd = [sys.executable, "-m", "gcgd_jax.train", "--config", suite.base_config]
    cmd += ["--out", str(directory)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_one(suite: Suite, method: str, budget: float, seed: int, out: Path) -> dict:
    """Run (or resume) one cell in its own process; returns its ``run.json`` record."""
    directory = run_dir(out, method, budget, seed)
    directory.mkdir(parents=True, exist_ok=True)
    matched = ()
    if method in MATCHED_SCALE and not is_complete(directory):
        scale = matched_control_scale(out, MATCHED_SCALE[method], budget, seed)
        matched = (f"model.gc_ode.control_scale={scale!r}",)
    name = f"{suite.name}/{method}/b{budget:g}/s{seed}"
    cmd = _command(suite, directory, method, budget, name, (*matched, f"run.seed={seed}"))
    return _train(cmd, [directory], (directory / "checkpoints").exists(), None)


def run_seeds(suite: Suite, method: str, budget: float, seeds: list[int], out: Path) -> dict:
    """Run (or resume) the cells of ``seeds`` of one method and budget as one seed-parallel
    ``gcgd-train --seeds`` process (``gcgd_jax.train.trainer``); each seed's folder is
    the folder :func:`run_one` would write, and gets the group's ``run.json`` record."""
    if method in MATCHED_SCALE:
        raise ValueError(f"{method} takes a per-seed control scale: run its seeds one by one")
    group = run_dir(out, method, budget, seeds[0]).parent
    directories = [run_dir(out, method, budget, s) for s in seeds]
    for d in directories:
        d.mkdir(parents=True, exist_ok=True)
    name = f"{suite.name}/{method}/b{budget:g}"
    cmd = _command(suite, group, method, budget, name, (f"run.seeds={list(seeds)}",))
    resume = any((d / "checkpoints").exists() for d in directories)
    note = (
        f"seed-parallel group of seeds {', '.join(map(str, seeds))} (one process, one jitted "
        "step): wall_s and peak_rss_mib are the group's"
    )
    return _train(cmd, directories, resume, note)


def _batches(cells: list[tuple[str, float, int]], seed_parallel: bool):
    """The cells to run, one per process, or (``seed_parallel``) grouped by method and
    budget in grid order (methods with a per-seed control scale stay one per process)."""
    if not seed_parallel:
        return [[c] for c in cells]
    groups: dict[tuple[str, float], list] = {}
    for c in cells:
        key = (c[0], c[1]) if c[0] not in MATCHED_SCALE else (c[0], c[1], c[2])
        groups.setdefault(key, []).append(c)
    return list(groups.values())


def command_line(
    suite: str,
    *,
    quick: bool = False,
    seeds: int | None = None,
    seed_parallel: bool = False,
    sets: tuple[str, ...] | list[str] = (),
) -> str:
    """The command of this runner that runs ``suite`` with these options (as its report names
    it)."""
    return (
        f"python -m experiments.suites.compare --suite {suite}"
        f"{' --quick' if quick else ''}"
        f"{'' if seeds is None else f' --seeds {seeds}'}"
        f"{' --seed-parallel' if seed_parallel else ''}"
        f"{''.join(' --set ' + s for s in sets)}"
    )


def report_notes(suite: Suite, grid: list[tuple[str, float, int]], base_cfg, command: str) -> str:
    """The notes at the head of a suite's report: its description, the overrides of each
    method of ``grid``, the shared settings of ``base_cfg`` (the suite's base configuration
    with its overrides) and ``command``, the command that ran the grid."""
    settings = "\n".join(
        f"| {m} | {', '.join(f'`{o}`' for o in suite.overrides_for(m)) or '(base configuration)'} |"
        for m in dict.fromkeys(m for m, _, _ in grid)
    )
    return (
        f"{suite.description}\n\n"
        "Methods are configuration overrides of the base configuration "
        f"(`gcgd_jax/configs/{suite.base_config}.toml`); every hyperparameter is the "
        "documented default of its method; the methods' own hyperparameters were not tuned. "
        f"Shared settings: base learning rate {base_cfg.optim.lr:g} (chosen for the baseline on a "
        "validation split, `experiments/results/lr_sweep/`, where a sweep exists), "
        f"model `{base_cfg.model.name}` with zero_init_residual = "
        f"{str(base_cfg.model.zero_init_residual).lower()}, budgets "
        f"{', '.join(f'{b:g}' for b in suite.budgets)} of the base schedule.\n\n"
        "| method | overrides |\n|---|---|\n"
        f"{settings}\n\n"
        + "".join(
            f"`{m}` also sets `model.gc_ode.control_scale` to the mean `gc_ode_grad_ratio` of "
            f"`{src}` at the same budget and seed (runs made before this was measured used "
            "1.0; each run's `config.toml` says which).\n\n"
            for m, src in MATCHED_SCALE.items()
            if any(c[0] == m for c in grid)
        )
        + f"Produced by `{command}`; per-run commands, machine, date, wall time and "
        "peak RSS are in each run's `run.json`, its configuration in `config.toml`."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a comparison suite and build its report.")
    parser.add_argument("--suite", required=True, choices=sorted(suites()))
    parser.add_argument("--quick", action="store_true", help="tiny smoke version")
    parser.add_argument(
        "--out", type=Path, help="results folder (default experiments/results/<suite>)"
    )
    parser.add_argument("--list", action="store_true", help="print the grid and exit")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    parser.add_argument("--methods", help="comma-separated subset of methods to run")
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs")
    parser.add_argument(
        "--seeds", type=int, help="seeds of every phase of the grid (default: the suite's)"
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="run a suite that requires a clean checkout from one whose tracked files differ "
        "from its commit (each run.json records it)",
    )
    parser.add_argument(
        "--seed-parallel",
        action="store_true",
        help="train the unfinished seeds of each method and budget as one seed-parallel "
        "gcgd-train --seeds process (same run folders)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override for every run of the suite (repeatable), e.g. data.name=synthetic",
    )
    args = parser.parse_args(argv)

    suite = quick(suites()[args.suite]) if args.quick else suites()[args.suite]
    suite = with_overrides(suite, tuple(args.set))
    if args.seeds is not None:
        if args.seeds < 0:
            parser.error(f"--seeds must be >= 0, got {args.seeds}")
        suite = suite.with_seeds(args.seeds)
    try:  # fail before the first run, with the config error, not inside 100 subprocesses
        base_cfg = load_config(suite.base_config, list(suite.overrides))
    except ConfigError as err:
        parser.error(str(err))
    for m in dict.fromkeys(c[0] for c in suite.grid()):
        try:  # every method's overrides too (a misspelt option in a suite definition)
            load_config(suite.base_config, list(suite.overrides_for(m)))
        except ConfigError as err:
            parser.error(f"method {m} of suite {suite.name}: {err}")
    out = args.out or RESULTS / suite.name
    grid = suite.grid()
    if args.methods:
        wanted = set(args.methods.split(","))
        unknown = wanted - set(METHODS)
        if unknown:
            parser.error(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
        grid = [c for c in grid if c[0] in wanted]
    if args.list:
        for m, b, s in grid:
            state = "done" if is_complete(run_dir(out, m, b, s)) else "todo"
            print(f"{state}  {m:28s} budget={b:<4g} seed={s}")
        return 0

    failures = []
    dirty = dirty_tree_error(suite)
    if dirty and not args.report_only and not args.allow_dirty:
        parser.error(dirty)
    if not args.report_only:
        if not all(is_complete(run_dir(out, m, b, s)) for m, b, s in grid):
            from gcgd_jax.train import load_data

            train_ds, _ = load_data(base_cfg)  # say which data the runs will read
            print(f"data: {base_cfg.data.name}, {train_ds.source}", flush=True)
        new = 0
        todo = [c for c in grid if not is_complete(run_dir(out, *c))]
        if args.max_runs is not None:
            todo = todo[: args.max_runs]
        for cells in _batches(todo, args.seed_parallel):
            m, b = cells[0][0], cells[0][1]
            seeds = [c[2] for c in cells]
            where = grid.index(cells[0]) + 1
            print(f"[{where}/{len(grid)}] {m} budget={b:g} seed(s) {seeds} ...", flush=True)
            if len(cells) == 1:
                rec = run_one(suite, m, b, seeds[0], out)
            else:
                rec = run_seeds(suite, m, b, seeds, out)
            new += len(cells)
            print(
                f"    exit {rec['exit_code']}, {rec['wall_s']} s, peak RSS {rec['peak_rss_mib']} MiB",
                flush=True,
            )
            if rec["exit_code"] != 0:
                failures.extend(cells)
    header = report_notes(
        suite,
        grid,
        base_cfg,
        command_line(
            args.suite,
            quick=args.quick,
            seeds=args.seeds,
            seed_parallel=args.seed_parallel,
            sets=args.set,
        ),
    )
    try:
        if suite.report == "long":
            build_long_report(out, suite, notes=header)
        else:
            build_report(out, title=f"Suite {suite.name}", notes=header)
        print(f"report: {out / 'RESULTS.md'}")
    except FileNotFoundError as err:
        print(f"no report: {err}", file=sys.stderr)
        return 1
    if failures:
        print(f"{len(failures)} run(s) failed: {failures}; see their train.log", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
