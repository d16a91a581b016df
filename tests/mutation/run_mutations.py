"""By-hand mutation check of the training system: does the test suite catch these bugs?

Run from the repository root (not collected by pytest, not part of CI; a few minutes)::

    .venv/bin/python tests/mutation/run_mutations.py            # all, writes REPORT.md
    .venv/bin/python tests/mutation/run_mutations.py nesterov   # the ones whose name matches

Each mutation is one exact text replacement in one file of the package. For each, the
repository (``gcgd_jax``, ``experiments``, ``tests``, ``pyproject.toml``) is copied to a
temporary folder, the replacement is applied there (the working tree is never touched),
and the tests named for it run against the copy (``PYTHONPATH`` puts the copy first, and
the script checks that the copy is what gets imported). A mutation is *caught* when those
tests fail (pytest exit code 1). Before the mutations, the same tests run once on an
unmutated copy and must pass, so a failure is the mutation's doing.

Every mutation in :data:`MUTATIONS` must be caught; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = Path(__file__).resolve().parent / "REPORT.md"
COPIED = ("gcgd_jax", "experiments", "tests", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "runs", ".pytest_cache")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (node ids, -k expressions)


def _identity(correction: str) -> Mutation:
    return Mutation(
        name=f"identity-{correction}",
        description=f"correction name `{correction}` wired to `optax.identity()`",
        path="gcgd_jax/train/optim.py",
        old="    factory: Callable[..., optax.GradientTransformation] = method.load()\n",
        new=(
            f"    if name == {correction!r}:\n"
            "        return optax.identity()\n"
            "    factory: Callable[..., optax.GradientTransformation] = method.load()\n"
        ),
        tests=(
            f"tests/train/test_optim.py::test_each_correction_name_builds_its_own_transform[{correction}]",
        ),
    )


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        name="resume-restores-nothing",
        description="`Trainer(resume=True)` starts from step 0 without restoring",
        path="gcgd_jax/train/trainer.py",
        old="        if not self.resume:\n            return 0, EpochSums(), initial\n",
        new="        if True:\n            return 0, EpochSums(), initial\n",
        tests=("tests/train/test_trainer.py", "-k", "resume or damaged"),
    ),
    *(
        _identity(c)
        for c in (
            "gc_w",
            "centralize",
            "channel_directed_h0",
            "channel_directed_sobolev",
            "znorm",
            "agr",
        )
    ),
    Mutation(
        name="nesterov-ignored",
        description="`optim.nesterov` is not passed to `optax.sgd`",
        path="gcgd_jax/train/optim.py",
        old="nesterov=optim.nesterov",
        new="nesterov=False",
        tests=("tests/train/test_optim.py", "-k", "base_optimizers"),
    ),
    Mutation(
        name="weight-decay-on-every-leaf",
        description='`optim.weight_decay_on = "kernels"` decays every leaf',
        path="gcgd_jax/train/optim.py",
        old='wd_mask = kernel_mask(params) if optim.weight_decay_on == "kernels" else None',
        new="wd_mask = None",
        tests=("tests/train/test_optim.py", "-k", "base_optimizers"),
    ),
    Mutation(
        name="nonfinite-guard-removed",
        description="the train step applies non-finite updates",
        path="gcgd_jax/train/step.py",
        old="apply = finite & ~state.halted",
        new="apply = ~state.halted",
        tests=("tests/train/test_trainer.py", "-k", "nonfinite or skipped"),
    ),
    Mutation(
        name="eval-padding-counted",
        description="the padding of the last eval batch gets weight 1",
        path="gcgd_jax/train/trainer.py",
        old="weights = np.concatenate([weights, np.zeros(pad, np.float32)])",
        new="weights = np.concatenate([weights, np.ones(pad, np.float32)])",
        tests=("tests/train/test_trainer.py", "-k", "run_and_evaluate"),
    ),
    Mutation(
        name="data-order-ignores-seed",
        description="the epoch's data order does not depend on `run.seed`",
        path="gcgd_jax/data/dataset.py",
        old="    order = np.random.default_rng((seed, epoch))",
        new="    order = np.random.default_rng((0, epoch))",
        tests=("tests/data/test_data_pipeline.py",),
    ),
    Mutation(
        name="cosine-first-leaf-only",
        description="the gradient-quality cosine's dot product sees only the first leaf",
        path="experiments/studies/grad_quality.py",
        old="    dot = sum(jnp.vdot(x, y) for x, y in zip(a, b))",
        new="    dot = sum(jnp.vdot(x, y) for x, y in zip(a[:1], b[:1]))",
        tests=("tests/experiments/test_grad_quality.py",),
    ),
    Mutation(
        name="unreadable-checkpoints-restart",
        description="`--resume` with every checkpoint unreadable starts from scratch "
        "(truncating metrics.jsonl), as before issue 16",
        path="gcgd_jax/train/trainer.py",
        old="        if found is None and damaged:\n",
        new="        if False:\n",
        tests=(
            "tests/train/test_trainer.py::test_every_checkpoint_damaged_is_an_error_that_changes_nothing",
            "tests/train/test_cli.py",
            "-k",
            "damaged",
        ),
    ),
)


def _copy_repo(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        else:
            shutil.copy2(src, dest / name)


def _apply(copy: Path, m: Mutation) -> None:
    path = copy / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(
            f"mutation {m.name}: expected the text to mutate once in {m.path}, found it "
            f"{count} times; update MUTATIONS to the current code"
        )
    path.write_text(text.replace(m.old, m.new))


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_import(copy: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import gcgd_jax; print(gcgd_jax.__file__)"],
        cwd=copy, env=_env(copy), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not what gets imported (gcgd_jax from {out})")


def _pytest(copy: Path, tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, check=False
    )
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.MULTILINE)
    return proc.returncode, failed, time.perf_counter() - t0


def _run_one(m: Mutation | None, tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    with tempfile.TemporaryDirectory(prefix="gcgd-mutation-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        if m is not None:
            _apply(copy, m)
        _check_import(copy)
        return _pytest(copy, tests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("select", nargs="*", help="run only mutations whose name contains one")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite REPORT.md")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.select or any(s in m.name for s in args.select)]
    if not chosen:
        parser.error(f"no mutation matches {args.select}; known: {[m.name for m in MUTATIONS]}")

    rows, missed = [], []
    baseline: dict[tuple[str, ...], tuple[int, list[str], float]] = {}
    for m in chosen:
        if m.tests not in baseline:
            baseline[m.tests] = _run_one(None, m.tests)
        base_rc, base_failed, _ = baseline[m.tests]
        if base_rc != 0:
            raise SystemExit(
                f"{m.name}: its tests fail without the mutation (exit {base_rc}: {base_failed}); "
                "fix the suite first"
            )
        rc, failed, seconds = _run_one(m, m.tests)
        caught = rc == 1 and bool(failed)
        if not caught:
            missed.append(m.name)
        verdict = "caught" if caught else ("MISSED" if rc == 0 else f"ERROR (pytest exit {rc})")
        print(
            f"{m.name:34s} {verdict:8s} {seconds:6.1f} s  {failed[0] if failed else ''}", flush=True
        )
        rows.append((m, verdict, failed, seconds))

    if not args.no_report and not args.select:
        _write_report(rows)
    if missed:
        print(f"not caught: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


def _write_report(rows) -> None:
    lines = [
        "# Mutation check of the training system",
        "",
        "Written by `.venv/bin/python tests/mutation/run_mutations.py` (see its docstring).",
        "Each mutation is applied to a temporary copy of the repository; its tests must pass",
        "unmutated and fail mutated. A run by hand, not part of CI.",
        "",
        "| mutation | change | file | tests run | result | first failing test |",
        "|---|---|---|---|---|---|",
    ]
    for m, verdict, failed, seconds in rows:
        tests = " ".join(m.tests).replace("|", "\\|")
        first = failed[0].replace("|", "\\|") if failed else "-"
        lines.append(
            f"| {m.name} | {m.description} | `{m.path}` | `{tests}` | {verdict} ({seconds:.0f} s) "
            f"| `{first}` |"
        )
    caught = sum(1 for _, v, _, _ in rows if v == "caught")
    lines += ["", f"{caught} of {len(rows)} mutations caught.", ""]
    REPORT.write_text("\n".join(lines))
    print(f"report: {REPORT}")


if __name__ == "__main__":
    raise SystemExit(main())
