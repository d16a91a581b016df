"""Cost of the forward-gradient estimators against backpropagation: time and memory per step.

Issue #37: the memory saving is the reason forward gradients exist, so it is measured here,
not assumed. For one model and batch, every variant below is the train step's own gradient
computation (:func:`gcgd_jax.train.step.make_grad_fn` with ``gradient.estimator`` set, so
each estimator gets the model, its credits and its exactly trained heads exactly as
``gcgd-train`` passes them: ``_estimate_fn``), jitted; with ``--train-step`` also the whole
train step (:func:`~gcgd_jax.train.step.make_train_step`: that gradient, ``optax.sgd(0.1,
momentum=0.9)``, the non-finite guard and the metrics; the state donated, as the trainer
does). Inputs are a uint8 batch of the data set, normalised inside the step; no augmentation.

Variants (``K``: directions averaged, vmapped; every estimator at every ``--directions``):

* ``--model mlp`` (a ReLU :class:`~gcgd_jax.models.MLP`, ``--hidden`` widths): ``backprop``
  (``jax.value_and_grad`` of the mean cross-entropy), ``fg_w`` (weight perturbation),
  ``fg_a`` (activity perturbation), ``guess_transpose`` and ``guess_activation_mixing``
  (Singhal et al.'s structured guesses; the isotropic and activation-perturbation guesses
  are ``fg_w`` and ``fg_a``);
* ``--model local_mixer`` (``--mixer M/1/16`` on MNIST, ``M/8/16`` on CIFAR-10): the global
  objective (the read-out's loss; the model built with ``local=False``): ``backprop``,
  ``fg_w``, ``fg_a``; and the local losses (``local=True``): ``lg_bp`` (local
  backpropagation), ``lg_fg_w``, ``lg_fg_a``. Ratios of a global variant are to
  ``backprop``, of a local one to ``lg_bp``.

Time: per-step wall time of the compiled program (blocked until ready), every variant
once per round in :func:`~experiments.common.timing.alternate`'s rotating order (one
untimed call after each switch, then ``--steps`` timed calls), pooled over ``--rounds``
rounds; median [min, max] and the ratio of medians to the reference.

Memory: XLA's own accounting of the compiled program,
``jax.jit(f).lower(*args).compile().memory_analysis()``: ``temp`` is the size of the
buffers XLA's buffer assignment gives the program's intermediate values (what the
activations, tangents and directions cost, with XLA's reuse of dead buffers), and
``total = temp + arguments + outputs - aliases`` (aliases: donated inputs reused as
outputs). It is deterministic on the CPU (same program, same numbers on any machine
with the same jaxlib), and it is *not* the process's resident memory: that also holds the
runtime, the compiled code, the data and the allocator's slack. With ``--rss`` every
variant also runs in a fresh subprocess (about 2 s of start-up each plus its compile)
that compiles it, runs it once to warm it up, returns freed memory to the system
(``malloc_trim``), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs
one more step and reads the mark (``VmHWM``): ``rss_step_mib`` is that peak less the
resident memory just before the step (Linux only; the allocator's reuse of memory it
kept makes it a lower bound). ``--memory-only`` compiles every variant and runs none: the
memory of a K too big to run on this machine (FG-A at K = 16 on M/8/16, batch 128, needs
about 15 GiB of temporaries).

Usage::

    python -m experiments.bench.bench_estimators --model local_mixer --mixer M/1/16 --batch 100
    python -m experiments.bench.bench_estimators --model mlp --hidden 256 256 --batch 128
    python -m experiments.bench.bench_estimators --model local_mixer --mixer M/8/16 --batch 128 \
        --directions 1 4 16 --memory-only
    python -m experiments.bench.bench_estimators --quick   # a smoke run: 2 rounds x 3 steps

Writes ``experiments/results/bench_estimators/<stem>.json`` and ``.md`` (``--name``; default
from the model and batch, ``_memory`` for ``--memory-only``, ``_quick`` for ``--quick``) with
the command, machine, date and commit. The table is rebuilt from the record alone
(:func:`markdown`).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the CPU convolution flag, before JAX starts (as gcgd-train)
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import REPO, RESULTS
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import alternate, summary, timed

OUT_DIR = RESULTS / "bench_estimators"
MODULE = "experiments.bench.bench_estimators"
MIB = 2**20

# variant name -> (the registry's ``gradient.estimator`` value, the LocalMixer objective is
# local, the backprop variant it is compared with)
MLP_VARIANTS: dict[str, tuple[str, bool, str]] = {
    "backprop": ("backprop", False, "backprop"),
    "fg_w": ("weight_perturbation", False, "backprop"),
    "fg_a": ("activity_perturbation", False, "backprop"),
    "guess_transpose": ("guess_transpose", False, "backprop"),
    "guess_activation_mixing": ("guess_activation_mixing", False, "backprop"),
}
MIXER_VARIANTS: dict[str, tuple[str, bool, str]] = {
    "backprop": ("backprop", False, "backprop"),
    "fg_w": ("weight_perturbation", False, "backprop"),
    "fg_a": ("activity_perturbation", False, "backprop"),
    "lg_bp": ("backprop", True, "lg_bp"),
    "lg_fg_w": ("weight_perturbation", True, "lg_bp"),
    "lg_fg_a": ("activity_perturbation", True, "lg_bp"),
}
DEFAULT_DATA = {"mlp": "mnist", "M/1/16": "mnist", "M/8/16": "cifar10"}
SCOPES = ("grad", "step")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One measured program: a variant of :data:`MLP_VARIANTS` / :data:`MIXER_VARIANTS` at
    ``K`` directions (``None`` for backprop), its gradient alone (``"grad"``) or the whole
    train step (``"step"``)."""

    name: str
    K: int | None
    scope: str = "grad"

    def describe(self) -> str:
        k = "" if self.K is None else f" K={self.K}"
        return f"{self.name}{k} [{self.scope}]"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model: ``kind`` ``"mlp"`` (``hidden`` widths) or ``"local_mixer"`` (``mixer``)."""

    kind: str
    image_shape: tuple[int, int, int]
    num_classes: int
    hidden: tuple[int, ...] = (256, 256)
    mixer: str = "M/1/16"
    seed: int = 0

    @property
    def table(self) -> dict[str, tuple[str, bool, str]]:
        return MLP_VARIANTS if self.kind == "mlp" else MIXER_VARIANTS

    def build(self, local: bool) -> nnx.Module:
        from gcgd_jax.models import MLP, LocalMixer

        rngs = nnx.Rngs(self.seed)
        if self.kind == "mlp":
            return MLP(int(np.prod(self.image_shape)), self.hidden, self.num_classes, rngs=rngs)
        return LocalMixer.from_config(
            self.mixer,
            image_shape=self.image_shape,
            num_classes=self.num_classes,
            local=local,
            rngs=rngs,
        )

    def describe(self) -> str:
        if self.kind == "mlp":
            return f"ReLU MLP {'-'.join(str(h) for h in self.hidden) or 'linear'}"
        return f"LocalMixer {self.mixer}"


def variants_of(
    spec: ModelSpec, directions: Sequence[int], names: Sequence[str] | None = None, *, step=False
) -> list[Variant]:
    """Every variant of ``spec``'s table (or ``names`` and their references) at every K
    (backprop once), for the gradient and, with ``step``, the whole train step."""
    chosen = list(spec.table) if names is None else list(names)
    for name in list(chosen):  # every chosen estimator's reference goes first
        ref = spec.table[name][2]
        if ref not in chosen:
            chosen.insert(0, ref)
    out = []
    for scope in SCOPES if step else ("grad",):
        for name in chosen:
            if spec.table[name][0] == "backprop":
                out.append(Variant(name, None, scope))
            else:
                out.extend(Variant(name, int(k), scope) for k in directions)
    return out


# ----------------------------------------------------------------------------
# Building and measuring one variant
# ----------------------------------------------------------------------------


def step_options(spec: ModelSpec, variant: Variant, mean, std):
    from gcgd_jax.train.step import StepOptions

    estimator = spec.table[variant.name][0]
    options = () if variant.K is None else (("num_directions", variant.K),)
    return StepOptions(
        mean=tuple(float(v) for v in np.ravel(mean)),
        std=tuple(float(v) for v in np.ravel(std)),
        estimator=estimator,
        estimator_options=options,
    )


def initial_state(model: nnx.Module, tx: optax.GradientTransformation):
    from gcgd_jax.train.step import TrainState

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.fold_in(jax.random.PRNGKey(0), 1),
        nonfinite=jnp.zeros((), jnp.int32),
        halted=jnp.zeros((), jnp.bool_),
    )
    return graphdef, state


def base_optimizer() -> optax.GradientTransformation:
    """``sgd(0.1, momentum=0.9)`` as the trainer builds its base optimizer (the learning
    rate injected, at the end of a chain: the step reads it for its metrics)."""
    return optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))


def memory_of(compiled: Any) -> dict[str, int]:
    """XLA's accounting of a compiled program, in bytes: ``temp``, ``argument``,
    ``output``, ``alias``, ``total`` (= temp + argument + output - alias) and XLA's own
    ``peak`` estimate where the backend reports one (else ``None``)."""
    m = compiled.memory_analysis()
    out = {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    out["total_bytes"] = (
        out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    )
    peak = getattr(m, "peak_memory_in_bytes", None)
    out["xla_peak_bytes"] = int(peak) if peak else None
    return out


@dataclasses.dataclass
class Prepared:
    """A compiled variant: ``run()`` does one step and blocks; ``memory`` is
    :func:`memory_of` its program; ``compile_s`` its lowering and compile time."""

    variant: Variant
    run: Callable[[], Any]
    memory: dict[str, int]
    compile_s: float


def prepare(spec: ModelSpec, variant: Variant, images, labels, mean, std) -> Prepared:
    """Builds, lowers and compiles ``variant`` on the batch ``images`` (uint8 NHWC) and
    ``labels`` (int32), normalised by ``mean`` and ``std`` inside the step."""
    from gcgd_jax.train.step import make_grad_fn, make_train_step

    local = spec.table[variant.name][1]
    tx = base_optimizer()
    graphdef, state = initial_state(spec.build(local), tx)
    opts = step_options(spec, variant, mean, std)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    t0 = time.perf_counter()
    if variant.scope == "grad":
        compiled = jax.jit(make_grad_fn(graphdef, opts)).lower(state, images, labels, None)
        compiled = compiled.compile()

        def run():
            return jax.block_until_ready(compiled(state, images, labels, None))

    else:
        step = jax.jit(make_train_step(graphdef, tx, opts), donate_argnums=0)
        compiled = step.lower(state, images, labels, None).compile()
        carry = {"state": state}

        def run():
            carry["state"], metrics = compiled(carry["state"], images, labels, None)
            return jax.block_until_ready(metrics)

    compile_s = time.perf_counter() - t0
    return Prepared(variant, run, memory_of(compiled), compile_s)


# ----------------------------------------------------------------------------
# Peak RSS in a fresh process (optional)
# ----------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M).group(1))


def rss_of_one_step(prepared: Prepared) -> dict[str, float]:
    """The kernel's peak resident memory over one step of ``prepared`` (already run once),
    from a mark reset just before it (Linux): ``rss_before_mib``, ``rss_peak_mib`` and
    ``rss_step_mib`` (their difference)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system
    except (OSError, AttributeError):
        pass
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    prepared.run()
    peak = _status_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
        "rss_step_mib": (peak - before) / 1024,
    }


def _rss_worker(request: dict) -> dict:
    spec = ModelSpec(**{**request["spec"], "image_shape": tuple(request["spec"]["image_shape"])})
    images, labels, mean, std, _ = load_batch(
        request["data"], request["data_dir"], spec.image_shape, request["batch"]
    )
    prepared = prepare(spec, Variant(**request["variant"]), images, labels, mean, std)
    prepared.run()  # warm: the runtime's one-time allocations
    return rss_of_one_step(prepared)


def rss_in_fresh_process(
    spec: ModelSpec, variant: Variant, data: str, data_dir: str | None, batch: int
) -> dict[str, float] | dict[str, str]:
    """:func:`rss_of_one_step` of ``variant`` in a new Python process (this module with
    ``--rss-worker``); ``{"error": ...}`` when it fails."""
    request = {
        "spec": dataclasses.asdict(spec),
        "variant": dataclasses.asdict(variant),
        "data": data,
        "data_dir": data_dir,
        "batch": batch,
    }
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, "--rss-worker", json.dumps(request)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def load_batch(data: str, data_dir: str | None, image_shape, batch: int):
    """``(images, labels, mean, std, source)``: the first ``batch`` training examples of
    ``data`` (``"synthetic"``: :func:`gcgd_jax.data.synthetic_dataset` of ``image_shape``)
    and its normalisation."""
    from gcgd_jax.data import load_dataset, normalization, synthetic_dataset

    if data == "synthetic":
        ds = synthetic_dataset(max(batch, 10), image_shape=tuple(image_shape), seed=0)
    else:
        ds = load_dataset(data, "train", data_dir=data_dir)
    if len(ds) < batch:
        raise ValueError(f"{data} has {len(ds)} training examples, fewer than batch {batch}")
    mean, std = normalization(ds.name)
    return ds.images[:batch], ds.labels[:batch], mean, std, ds.source


def dataset_shape(data: str) -> tuple[tuple[int, int, int], int]:
    from gcgd_jax.data.dataset import SPECS, canonical_name

    s = SPECS[canonical_name(data)]
    return tuple(s.image_shape), s.num_classes


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def bench(
    spec: ModelSpec,
    variants: Sequence[Variant],
    images,
    labels,
    mean,
    std,
    *,
    rounds: int,
    steps: int,
    rss: Callable[[Variant], dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Compiles every variant, times them side by side (``rounds`` 0: not at all, memory
    only) and returns the record's rows (:func:`rows_of`)."""
    prepared = {}
    for v in variants:
        prepared[v] = p = prepare(spec, v, images, labels, mean, std)
        if progress:
            print(
                f"[bench] {v.describe()}: compiled in {p.compile_s:.1f} s, "
                f"temp {p.memory['temp_bytes'] / MIB:.2f} MiB",
                file=sys.stderr,
                flush=True,
            )

    def measure(_: int, v: Variant) -> list[float]:
        prepared[v].run()  # one untimed step after the switch
        return timed(prepared[v].run, steps)

    times = alternate(list(variants), rounds, measure, describe=Variant.describe, progress=progress)
    extra = {v: {"compile_s": prepared[v].compile_s} for v in variants}
    if rss is not None:
        for v in variants:
            extra[v]["rss"] = rss(v)
    return rows_of(spec, times, {v: prepared[v].memory for v in variants}, extra, len(labels))


def _summary(times: Sequence[float], batch: int) -> dict:
    if not times:
        untimed = ("step_s_min", "step_s_median", "step_s_max", "images_per_s")
        return {"n": 0, **dict.fromkeys(untimed)}
    return summary(times, batch)


def rows_of(
    spec: ModelSpec,
    times: dict[Variant, list[float]],
    memory: dict[Variant, dict],
    extra: dict[Variant, dict],
    batch: int,
) -> list[dict]:
    """One row per variant: its name, estimator, objective, K, scope, timing
    :func:`~experiments.common.timing.summary` (``None`` times and ``n`` 0 when it was not
    timed), memory (:func:`memory_of`) and the ratios of its median time, temp and total
    bytes to its reference's (same scope)."""
    by_key = {(v.name, v.K, v.scope): v for v in times}
    rows = []
    for v, ts in times.items():
        estimator, local, reference = spec.table[v.name]
        ref = by_key.get((reference, None, v.scope))
        s = _summary(ts, batch)
        row = {
            "variant": v.name,
            "estimator": estimator,
            "objective": ("local" if local else "global") if spec.kind == "local_mixer" else None,
            "K": v.K,
            "scope": v.scope,
            "reference": reference,
            **s,
            **memory[v],
            **extra.get(v, {}),
        }
        if ref is not None:
            ref_s, ref_m = _summary(times[ref], batch), memory[ref]
            timed_both = s["n"] and ref_s["n"]
            row["time_ratio"] = s["step_s_median"] / ref_s["step_s_median"] if timed_both else None
            row["temp_ratio"] = memory[v]["temp_bytes"] / max(ref_m["temp_bytes"], 1)
            row["total_ratio"] = memory[v]["total_bytes"] / max(ref_m["total_bytes"], 1)
        else:
            row["time_ratio"] = row["temp_ratio"] = row["total_ratio"] = None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _times_ms(r: dict) -> str:
    if not r["n"]:
        return "not timed"
    return (
        f"{1e3 * r['step_s_median']:.2f} [{1e3 * r['step_s_min']:.2f}, {1e3 * r['step_s_max']:.2f}]"
    )


def markdown(record: dict) -> str:
    """The record's tables (a pure function of the record)."""
    s = record["settings"]
    lines = [
        (
            f"# Estimator cost: {s['model_description']}, batch {s['batch']} "
            f"({'QUICK SMOKE RUN' if s['quick'] else 'full run'})"
        ),
        "",
    ]
    if s["quick"]:
        lines += [
            (
                "**`--quick`: few steps, possibly on a busy machine. A smoke test of the "
                "script, not a measurement; do not quote these times.**"
            ),
            "",
        ]
    lines += [
        f"- command: `{record['command']}`",
        f"- date (UTC): {record['date']}",
        f"- code: commit {record.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(record['machine'])}",
        (
            f"- data: {s['data']} ({s['data_source']}), the first {s['batch']} training "
            f"images; {s['num_params']:,} parameters"
        ),
        (
            f"- timing: {s['rounds']} alternating rounds x {s['steps']} timed steps per "
            "variant (one untimed step after each switch); median [min, max] per step"
            if s["rounds"]
            else "- timing: none (`--memory-only`: every variant compiled, none run)"
        ),
        (
            "- memory: XLA's buffer assignment of the compiled program "
            "(`compile().memory_analysis()`): temp = its intermediate buffers (what the "
            "activations, tangents and directions cost); total = temp + arguments + outputs "
            "- donated aliases. Not the process's resident memory."
        ),
    ]
    if s.get("rss"):
        lines.append(
            "- RSS step: the peak resident memory of one step in a fresh process, less the "
            "resident memory just before it (a lower bound)"
        )
    lines += [
        "- ratios: to `backprop` (global objective) or `lg_bp` (local losses), same scope",
        "",
    ]
    for scope, title in (("grad", "The gradient computation"), ("step", "The whole train step")):
        rows = [r for r in record["rows"] if r["scope"] == scope]
        if not rows:
            continue
        header = (
            "| variant | K | step ms, median [min, max] | time / backprop | temp MiB "
            "| temp / backprop | total MiB |"
        )
        rule = "|---|---:|---|---:|---:|---:|---:|"
        if s.get("rss"):
            header += " RSS step MiB |"
            rule += "---:|"
        lines += [f"## {title}", "", header, rule]
        for r in rows:
            line = (
                f"| {r['variant']} | {'-' if r['K'] is None else r['K']} | "
                f"{_times_ms(r)} | {_ratio(r['time_ratio'])} | "
                f"{r['temp_bytes'] / MIB:.2f} | {_ratio(r['temp_ratio'])} | "
                f"{r['total_bytes'] / MIB:.2f} |"
            )
            if s.get("rss"):
                rss = r.get("rss") or {}
                line += f" {rss['rss_step_mib']:.1f} |" if "rss_step_mib" in rss else " error |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _stem(spec: ModelSpec, batch: int, quick: bool, memory_only: bool) -> str:
    if spec.kind == "mlp":
        tag = "mlp_" + ("x".join(str(h) for h in spec.hidden) or "linear")
    else:
        tag = "mixer_" + spec.mixer.replace("/", "_")
    return f"{tag}_b{batch}" + ("_memory" if memory_only else "") + ("_quick" if quick else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "local_mixer"), default="local_mixer")
    parser.add_argument("--mixer", choices=("M/1/16", "M/8/16"), default="M/1/16")
    parser.add_argument("--hidden", type=int, nargs="*", default=[256, 256], help="MLP widths")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--directions", type=int, nargs="+", default=None, help="K list (1 4 16; quick: 1 4)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=None, help="a subset of the model's variants"
    )
    parser.add_argument(
        "--data", default=None, help="mnist, cifar10 or synthetic (default: the model's)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding the data set (default: the search)"
    )
    parser.add_argument("--train-step", action="store_true", help="also the whole train step")
    parser.add_argument("--rss", action="store_true", help="peak RSS in a fresh process each")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="compile every variant for its memory, run none (K too big to run here)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (10)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (5)")
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps, K 1 4")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--name", default=None, help="output file stem")
    parser.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    if args.rss_worker is not None:
        print(json.dumps(_rss_worker(json.loads(args.rss_worker))), flush=True)
        return {}

    q = args.quick
    key = "mlp" if args.model == "mlp" else args.mixer
    data = args.data or DEFAULT_DATA[key]
    image_shape, num_classes = dataset_shape(data)
    spec = ModelSpec(
        args.model, image_shape, num_classes, tuple(args.hidden), args.mixer, args.seed
    )
    unknown = set(args.variants or ()) - set(spec.table)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(spec.table)}")
    directions = args.directions or ([1, 4] if q else [1, 4, 16])
    rounds, steps = args.rounds or (2 if q else 10), args.steps or (3 if q else 5)
    if args.memory_only:
        if args.rss:
            parser.error("--rss runs every variant; it cannot go with --memory-only")
        rounds = 0
    variants = variants_of(spec, directions, args.variants, step=args.train_step)
    images, labels, mean, std, source = load_batch(data, args.data_dir, image_shape, args.batch)
    num_params = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(spec.build(True), nnx.Param))
    )

    def rss(v: Variant) -> dict:
        print(f"[bench] RSS of {v.describe()} in a fresh process ...", file=sys.stderr, flush=True)
        return rss_in_fresh_process(spec, v, data, args.data_dir, args.batch)

    rows = bench(
        spec,
        variants,
        images,
        labels,
        mean,
        std,
        rounds=rounds,
        steps=steps,
        rss=rss if args.rss else None,
    )
    record = {
        "command": command(MODULE, argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "settings": {
            "quick": q,
            "model": args.model,
            "mixer": args.mixer if args.model == "local_mixer" else None,
            "hidden": list(args.hidden) if args.model == "mlp" else None,
            "model_description": spec.describe(),
            "num_params": num_params,
            "batch": args.batch,
            "data": data,
            "data_source": source,
            "directions": directions,
            "rounds": rounds,
            "steps": steps,
            "train_step": args.train_step,
            "rss": args.rss,
            "optimizer": "optax.sgd(0.1, momentum=0.9) (train step only)",
        },
        "rows": rows,
    }
    stem = args.name or _stem(spec, args.batch, q, args.memory_only)
    text = markdown(record)
    write(args.out, stem, record, text)
    print(text)
    print(f"[bench] wrote {args.out / (stem + '.json')} and .md", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
