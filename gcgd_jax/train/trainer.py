"""The training loop: data, model, optimizer, jitted steps, evaluation, checkpoints.

:class:`Trainer` trains one configuration. A run is N >= 1 independent
*replicas* of it, one per seed, advanced together by one compiled step: the
train state carries a leading replica axis. By default N = 1 (``run.seed``) and
the run writes its folder::

    <out>/config.toml      the resolved configuration (re-usable with --config)
    <out>/metrics.jsonl    one record per epoch, then a summary record
    <out>/checkpoints/     orbax checkpoints (see gcgd_jax.train.checkpoint)
    <out>/run.log          the notes printed on the stream

Seed-parallel runs: ``run.seeds = [0, 1, 2, 3]`` (``gcgd-train --seeds 0,1,2,3``)
trains one replica per seed, each exactly the run that ``run.seed = s`` would be:
its own initialisation (model, GC-W predictor), data order, augmentation keys,
optimizer and GC-W state, GC-ODE gates, metrics and non-finite guard. Replica
``s`` writes ``<out>/s<seed>/`` in exactly the format above (its ``config.toml``
holds its own ``run.seed`` and no ``run.seeds``), so ``gcgd-train --resume --out
<out>/s1`` continues one replica alone and every tool that reads a run folder
reads a replica's; ``<out>/config.toml`` is the group's configuration and
``gcgd-train --resume --out <out>`` continues the group. How the replicas share
the step (``run.replica_strategy``): ``"vmap"`` batches the step over the replica
axis (convolutions become grouped ones), ``"unroll"`` puts one copy of the step per
replica into the program (the single run's kernels, so its numbers; compile time
grows with N), ``"auto"`` unrolls on the CPU and vmaps elsewhere. One replica
always runs the single step (unrolled once). The replicas step in lockstep, so a
group resumes from the newest checkpoint step that every unfinished replica can
restore; a replica whose folder already ends with a summary record is left as it
is. A group's summary records have one extra key, ``replicas`` (N); step times and
images/s are those of the shared step. Seed-parallel runs are single-process.

Data parallelism: a 1-D mesh ``('data',)`` over the devices (all of them by
default, ``run.num_devices`` to use fewer), the train state replicated
(``NamedSharding(mesh, P())``), every replica's batch split along its batch axis
(``P(None, 'data')``), one ``jax.jit`` step; XLA inserts the gradient all-reduce
and computes BatchNorm statistics over the whole global batch, so the result
equals the single-device step up to the order of floating-point sums. With
``run.distributed = true``, ``jax.distributed.initialize()`` runs first and
each process feeds its slice of every global batch.

Exact resumption: the data order of an epoch is a function of
``(seed, epoch)``, the augmentation key of a step is ``fold_in(rng, step)``,
and a checkpoint stores the full state of a replica (parameters, BatchNorm
statistics, optimizer and GC-W state, counters) and the running sums of the
epoch's train metrics, so a resumed run computes the same numbers as one that
never stopped; ``metrics.jsonl`` is cut back to the checkpoint's step on resume.
Timing fields naturally differ. A resumed process says where it started: a note
on the stream, a ``{"kind": "resume", "step": ...}`` record in ``metrics.jsonl``
and ``resumed_from_step`` / ``steps_run`` in the summary record.

Damaged checkpoints: with ``resume=True`` the newest checkpoint that restores
is used; newer unreadable ones are moved aside (``<step>.damaged``, with a
note naming them). When none restores, :class:`CheckpointError` names every
damaged step and nothing in the output folder is changed (the CLI exits 2).

Non-finite losses are handled per replica: under ``train.nan_policy = "skip"``
the replica's step is skipped (its state unchanged) and counted in its records;
under ``"stop"`` the step guard freezes that replica at its last good state (no
value crosses the replica axis, so the others are unaffected), its folder gets a
checkpoint of that state and a ``"nonfinite"`` summary record, the others train
on to the end, and :meth:`Trainer.run` then raises :class:`NonFiniteLossError`.

Steps are dispatched one ahead: the host prepares and dispatches step ``i+1``
before it reads step ``i``'s metrics, so the device never waits for Python.

Public seams, for benchmarks and diagnostics that must compute exactly what a run
computes: :meth:`Trainer.batches` (the run's data order, replica-stacked),
:meth:`Trainer.put_batch`, :meth:`Trainer.dispatch` / :meth:`Trainer.train_step`
(the jitted step), :meth:`Trainer.replica_state`, :attr:`Trainer.grad_fn` and
:attr:`Trainer.update_fn` (one replica's step in its two halves) and
:meth:`Trainer.train_epoch` (the loop). What a configuration builds (data, model,
step options) is in :mod:`gcgd_jax.train.build`, the device mesh in
:mod:`gcgd_jax.train.devices`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gcgd_jax import methods
from gcgd_jax.train.build import build_model, load_data, load_final_test, step_options
from gcgd_jax.train.checkpoint import Checkpointer, DamagedCheckpoint
from gcgd_jax.train.config import (
    RESNET_MODELS,
    ConfigError,
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    flat_config,
    ignored_options_note,
    to_toml,
)
from gcgd_jax.train.devices import DataParallel, host_value
from gcgd_jax.train.lock import RunLock
from gcgd_jax.train.optim import build_optimizer
from gcgd_jax.train.report import (
    TENSORBOARD_MISSING,
    MetricsWriter,
    ProgressBar,
    read_metrics,
    summary_table,
    tensorboard_available,
)
from gcgd_jax.train.step import (
    TrainState,
    make_eval_step,
    make_grad_fn,
    make_train_step,
    make_update_fn,
)

__all__ = [
    "CheckpointError",
    "EpochAccount",
    "EpochResult",
    "EpochSums",
    "NonFiniteLossError",
    "Replica",
    "Trainer",
    "replica_config",
    "replica_dir",
    "train",
]

# Settings that may change between a run and its resumption (they do not change the numbers).
_RESUMABLE_CHANGES = (
    "run.name", "run.out_dir", "run.num_devices", "run.distributed", "run.fusion_breaker",
    "run.replica_strategy", "data.data_dir", "data.cache_dir", "data.download", "train.nan_policy",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``train.nan_policy = "stop"``)."""


class CheckpointError(RuntimeError):
    """``resume=True`` but no checkpoint of the run can be read (nothing was changed)."""


@dataclasses.dataclass
class EpochSums:
    """Running sums of one epoch's train metrics (checkpointed with the state)."""

    loss: float = 0.0
    correct: int = 0
    examples: int = 0
    steps: int = 0
    skipped: int = 0
    lr: float | None = None
    # the model's auxiliary metrics (StepOptions.aux): the sum over the epoch's steps of
    # each "mean" metric, the last step's value of each "last" one (e.g. gc_ode_gate)
    model_aux: dict[str, float] = dataclasses.field(default_factory=dict)
    # last value of each optimizer-state metric (record key -> value), e.g. gc_w_predictor_loss
    state_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> EpochSums:
        """The sums saved in a checkpoint's metadata; ``CheckpointError`` naming the keys
        of a checkpoint this version does not write."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - fields)
        if unknown:
            raise CheckpointError(
                f"the checkpoint's epoch sums hold keys this version does not know: {unknown} "
                "(written by another version of gcgd_jax); start the run again with --overwrite"
            )
        dicts = {key: dict(saved.get(key) or {}) for key in ("state_metrics", "model_aux")}
        return cls(**{**saved, **dicts})


@dataclasses.dataclass
class EpochResult:
    """What :meth:`Trainer.train_epoch` returns (lists in replica order)."""

    step: int  # the global step reached
    sums: list[EpochSums]
    step_times: list[float]  # completion-to-completion seconds of each step after the first
    failed: list[tuple[int, float] | None]  # (step, loss) of a non-finite step under "stop"


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """A step's metrics (device arrays) as host arrays (this waits for the step)."""
    return {k: host_value(v) for k, v in metrics.items()}


class EpochAccount:
    """One run's bookkeeping of the completed steps of an epoch.

    :meth:`complete` takes a step's metrics as host values (in step order) and
    adds them to the epoch's :class:`EpochSums`, records the step time, notices
    a non-finite step (``failed`` under ``train.nan_policy = "stop"``; later
    steps are ignored), and drives the progress bar and the TensorBoard
    scalars. A run keeps one per replica.
    """

    def __init__(self, trainer: Trainer, epoch, start_batch, sums, bar, writer=None):
        self.trainer, self.epoch, self.start_batch = trainer, epoch, start_batch
        self.sums, self.bar, self.writer = sums, bar, writer
        log = trainer.cfg.log
        self.tb_every = log.tensorboard_every_steps if log.tensorboard else 0
        self.times: list[float] = []  # completion-to-completion seconds after the first step
        self.failed: tuple[int, float] | None = None
        self._last_done: float | None = None
        self._t_start = time.perf_counter()

    def restart_clock(self) -> None:
        """Speeds are measured from now on (after the compilation)."""
        self._t_start = time.perf_counter()

    def complete(self, m: dict[str, np.ndarray], done_step: int) -> None:
        """Accounts for the step that reached global step ``done_step``."""
        if self.failed is not None:
            return  # steps after a failure under "stop" were no-ops
        trainer, sums = self.trainer, self.sums
        bs = trainer.cfg.data.batch_size
        now = time.perf_counter()
        if self._last_done is not None:
            self.times.append(now - self._last_done)
        self._last_done = now
        if not bool(m["finite"]):
            sums.skipped += 1
            if trainer.cfg.train.nan_policy == "stop":
                self.failed = (done_step - 1, float(m["loss"]))
            return
        sums.loss += float(m["loss"])
        sums.correct += int(m["correct"])
        sums.examples += bs
        sums.steps += 1
        sums.lr = float(m["lr"])
        for key, reduction in trainer.step_options.aux.metrics:
            if key in m:
                value = float(m[key])
                if reduction == "mean":
                    value += sums.model_aux.get(key, 0.0)
                sums.model_aux[key] = value
        for key in trainer.state_metric_keys:
            sums.state_metrics[key] = float(m[key])
        done = done_step - self.epoch * trainer.steps_per_epoch
        speed = (done - self.start_batch) * bs / max(now - self._t_start, 1e-9)
        self.bar.update(done, sums.loss / max(sums.steps, 1), speed)
        if self.writer is not None and self.tb_every and done_step % self.tb_every == 0:
            self.writer.scalars(
                done_step,
                {"loss": float(m["loss"]), "lr": float(m["lr"]), "images_per_s": speed},
            )


def run_steps(
    step: int,
    end: int,
    *,
    dispatch: Callable[[], Any],
    complete: Callable[[Any, int], None],
    failed: Callable[[], bool],
    save: Callable[[int], None],
    every: int,
    stop_at_step: int | None,
) -> int:
    """The step loop of an epoch.

    ``dispatch()`` launches one step and returns its metrics (device arrays) without
    waiting; they are handed to ``complete(metrics, step_reached)`` only after the next
    step is launched, so the host's bookkeeping overlaps the device's work. Every
    ``every`` steps (not at ``end``, where the epoch's record is written) the pending
    metrics are completed first and ``save(step)`` writes a checkpoint. The loop stops
    at ``end``, at ``stop_at_step``, or as soon as ``failed()``; returns the step reached.
    """
    pending = None  # (metrics, step) of the step dispatched last, not yet completed
    while step < end and not failed():
        metrics = dispatch()
        step += 1
        if pending is not None:
            complete(*pending)
        pending = (metrics, step)
        if every and step % every == 0 and step < end:
            complete(*pending)  # the checkpoint's sums include it
            pending = None
            save(step)
        if stop_at_step is not None and step >= stop_at_step:
            break
    if pending is not None:
        complete(*pending)
    return step


# --------------------------------------------------------------------------- replicas


def replica_dir(out: str | Path, seed: int) -> Path:
    """The folder of the replica of ``seed`` in a seed-parallel run's ``out``."""
    return Path(out) / f"s{seed}"


def replica_config(cfg: TrainConfig, seed: int, out: str | Path) -> TrainConfig:
    """The single-run configuration of one replica: ``run.seed = seed``, no ``run.seeds``."""
    return cfg.replace(run={"seed": seed, "seeds": (), "out_dir": str(replica_dir(out, seed))})


def _index(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _stack(trees: list[Any]) -> Any:
    if len(trees) == 1:
        return jax.tree.map(lambda x: jnp.expand_dims(x, 0), trees[0])
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class _Prefixed:
    """A text stream that starts every line with a prefix (a replica's lines)."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix = stream, prefix

    def write(self, text: str) -> int:
        lines = text.splitlines(keepends=True)
        return self.stream.write("".join(self.prefix + line for line in lines))

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@dataclasses.dataclass(eq=False)  # hashable by identity: a key of the epoch's accounts
class Replica:
    """The host side of one seed of a run: its folder and what writes there."""

    seed: int
    cfg: TrainConfig  # the seed's single-run configuration
    out: Path  # its folder: the run's own, or <out>/s<seed>/ in a seed-parallel run
    stream: TextIO  # where its notes go (prefixed with [s<seed>] in a seed-parallel run)
    index: int  # position on the state's replica axis
    lock: RunLock | None = None
    ckpt: Checkpointer | None = None
    writer: MetricsWriter | None = None
    sums: EpochSums = dataclasses.field(default_factory=EpochSums)
    start_step: int = 0
    resumed_from: int | None = None  # the checkpoint step run() continued from
    stopped: NonFiniteLossError | None = None  # stopped on a non-finite loss


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``cfg`` into ``out_dir``: one replica per seed of ``run.seeds``, or one of
    ``run.seed`` (see the module's docstring).

    Args:
        cfg: a validated configuration.
        out_dir: the output folder (default ``cfg.run.out_dir``).
        resume: continue from the newest readable checkpoint (start from scratch, with a
            note, when none was saved yet); a seed-parallel run continues every
            unfinished replica.
        overwrite: delete an earlier run's metrics and checkpoints in the folder(s).
        stream: where progress and notes go (stderr by default); in a seed-parallel run
            a replica's lines start with ``[s<seed>]``.
        datasets: ``(train, eval)`` data sets already built for this configuration
            (:func:`gcgd_jax.train.build.load_data`), or ``(train, eval, test)`` with
            ``train.final_test``'s test split (:func:`~gcgd_jax.train.build.load_final_test`);
            None loads them. Every replica reads the same ones (the data split does not
            depend on the run's seed).

    Raises:
        ConfigError: invalid settings found while building (data, model,
            correction options, batch size vs devices, resuming a different config).
        RunFolderBusy: another live process is writing the folder (a ``ConfigError``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        stream: TextIO | None = None,
        datasets: tuple[Any, ...] | None = None,
    ):
        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
        self.resume = resume
        self.stream = stream if stream is not None else sys.stderr
        self.seed_parallel = bool(cfg.run.seeds)
        if cfg.log.tensorboard and not tensorboard_available():
            raise ConfigError(TENSORBOARD_MISSING)
        self._train_compiled = self._eval_compiled = False
        self.first_step_s: float | None = None  # compile + first train step, once it ran
        self._group_lock: RunLock | None = None
        self.replicas: list[Replica] = []  # the unfinished ones, in seed order
        self.finished: dict[int, str] = {}  # seed -> status of a replica that already ended
        self._setup_devices()  # first: jax.distributed decides which process writes
        try:
            self._setup_folders(overwrite)
            self._setup_data(datasets)
            if self.replicas:
                self._setup_model_and_optimizer()
                self._build_steps()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the run folders' locks (:mod:`gcgd_jax.train.lock`); :meth:`run` does
        this when it ends. The process exiting releases them too, however it exits."""
        for r in self.replicas:
            if r.lock is not None:
                r.lock.release()
        if self._group_lock is not None:
            self._group_lock.release()

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the only one that writes files and prints."""
        return jax.process_index() == 0

    @property
    def seeds(self) -> tuple[int, ...]:
        """The run's seeds: ``run.seeds``, or ``(run.seed,)``."""
        return self.cfg.run.seeds or (self.cfg.run.seed,)

    def _note(self, message: str, replica: Replica | None = None) -> None:
        """A line on the stream and in ``run.log`` (process 0 only): ``replica``'s, or the
        run's (every replica's ``run.log``)."""
        if not self.is_main:
            return
        stream = self.stream if replica is None else replica.stream
        stream.write(message + "\n")
        stream.flush()
        for r in self.replicas if replica is None else [replica]:
            self._log(r, message)

    def _log(self, replica: Replica, text: str) -> None:
        """Appends ``text`` to the replica's ``run.log`` (process 0 only)."""
        if self.is_main:
            replica.out.mkdir(parents=True, exist_ok=True)
            with (replica.out / "run.log").open("a") as f:
                f.write(text + "\n")

    def _setup_folders(self, overwrite: bool) -> None:
        """Locks every folder the run writes, then checks (or, with ``overwrite``, clears)
        them. One writer per run folder, from before anything in it is touched
        (``--overwrite`` deletes) until the run ends: a second live process gets
        ``RunFolderBusy``. A seed-parallel run locks its group folder first."""
        cfg, out = self.cfg, self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output folder {out} is a file; choose another --out")
        if self.seed_parallel:
            if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
                raise ConfigError(
                    f"output folder {out} holds a single run; a seed-parallel run writes "
                    f"{out}/s<seed>/ and its own config.toml there: choose another --out"
                )
            self._group_lock = RunLock(out) if self.is_main else None
            if self.resume:
                for seed in cfg.run.seeds:
                    records = read_metrics(replica_dir(out, seed) / "metrics.jsonl")
                    if records and records[-1].get("kind") == "summary":
                        self.finished[seed] = records[-1].get("status", "completed")
        for seed in self.seeds:
            if seed in self.finished:
                continue
            if self.seed_parallel:
                r = Replica(
                    seed,
                    replica_config(cfg, seed, out),
                    replica_dir(out, seed),
                    _Prefixed(self.stream, f"[s{seed}] "),
                    len(self.replicas),
                )
            else:
                r = Replica(seed, cfg, out, self.stream, 0)
            self.replicas.append(r)
            r.lock = RunLock(r.out) if self.is_main else None
            self._check_out_dir(r, overwrite)

    def _check_out_dir(self, r: Replica, overwrite: bool) -> None:
        metrics = r.out / "metrics.jsonl"
        ckpts = r.out / "checkpoints"
        if overwrite:
            if self.is_main:
                metrics.unlink(missing_ok=True)
                (r.out / "run.log").unlink(missing_ok=True)
                shutil.rmtree(ckpts, ignore_errors=True)
        elif not self.resume and (metrics.exists() or ckpts.exists()):
            raise ConfigError(
                f"output folder {r.out} already holds a run; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )

    def _setup_devices(self) -> None:
        run = self.cfg.run
        if run.distributed and not jax.distributed.is_initialized():
            jax.distributed.initialize()
        try:
            self.parallel = DataParallel.create(run.num_devices)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        n = self.parallel.size
        bs = self.cfg.data.batch_size
        ebs = self.cfg.data.eval_batch_size or bs
        for key, value in (("data.batch_size", bs), ("data.eval_batch_size", ebs)):
            if value % n:
                raise ConfigError(
                    f"{key} = {value} must be divisible by the number of devices ({n}); "
                    f"use a multiple of {n} or set run.num_devices"
                )
        self.eval_batch_size = ebs
        self.devices = list(self.parallel.devices)
        self.mesh = self.parallel.mesh
        self.replicated = self.parallel.replicated
        self.batch_sharding = self.parallel.batch_sharding
        self.replica_batch_sharding = self.parallel.replica_batch_sharding
        fb = run.fusion_breaker
        # The fusion breaker: a runtime float32 1.0 the model divides by between blocks
        # (gcgd_jax.ops.fusion), or None for none; every step function takes it.
        # (only the ResNets place it: gcgd_jax.ops.fusion)
        resnet = self.cfg.model.name in RESNET_MODELS
        on = resnet and (fb == "on" or (fb == "auto" and self.parallel.platform == "cpu"))
        self.fusion_breaker = jax.device_put(jnp.float32(1.0), self.replicated) if on else None

    def _setup_data(self, datasets: tuple[Any, ...] | None = None) -> None:
        cfg = self.cfg
        if datasets is None:
            datasets = load_data(cfg)
        self.train_ds, self.eval_ds = datasets[:2]
        # train.final_test: the test split, evaluated once after the last step
        self.test_ds = datasets[2] if len(datasets) > 2 else load_final_test(cfg)
        self.eval_prefix = "val" if cfg.data.eval_split == "val" else "test"
        n_train = len(self.train_ds.labels)
        bs = cfg.data.batch_size
        self.steps_per_epoch = n_train // bs
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size = {bs} is larger than the training set ({n_train} examples)"
            )
        base_steps = cfg.train.total_steps or cfg.train.epochs * self.steps_per_epoch
        self.total_steps = max(1, round(cfg.train.budget * base_steps))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        _, h, w, c = self.train_ds.images.shape
        self.image_shape = (h, w, c)

    def _setup_model_and_optimizer(self) -> None:
        cfg = self.cfg
        num_classes = cfg.model.num_classes or self.train_ds.num_classes
        in_channels = cfg.model.in_channels or self.image_shape[-1]
        if in_channels != self.image_shape[-1]:
            raise ConfigError(
                f"model.in_channels = {in_channels} but {cfg.data.name} images have "
                f"{self.image_shape[-1]} channel(s)"
            )
        if num_classes < self.train_ds.num_classes:
            raise ConfigError(
                f"model.num_classes = {num_classes} but {cfg.data.name} has {self.train_ds.num_classes} classes"
            )
        states = []
        for r in self.replicas:  # each seed initialises its own model and optimizer state
            model = build_model(
                r.cfg,
                num_classes=num_classes,
                in_channels=in_channels,
                image_shape=self.image_shape,
            )
            model.train()
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            opt = build_optimizer(
                r.cfg,
                params=params,
                model=model,
                total_steps=self.total_steps,
                steps_per_epoch=self.steps_per_epoch,
            )
            if not states:
                self.graphdef, self.opt = graphdef, opt
                model.eval()
                self.eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
                model.train()
                self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
            elif graphdef != self.graphdef:
                raise ConfigError(  # pragma: no cover - the seed enters values only
                    f"run.seeds: the model of seed {r.seed} differs in structure from that of "
                    f"seed {self.replicas[0].seed}; seed-parallel replicas must share one graph"
                )
            states.append(
                TrainState(
                    params=params,
                    rest=rest,
                    opt_state=opt.tx.init(params),  # a seed reaches tx.init (GC-W's predictor)
                    step=jnp.zeros((), jnp.int32),
                    rng=jax.random.fold_in(jax.random.PRNGKey(r.seed), 1),
                    nonfinite=jnp.zeros((), jnp.int32),
                    halted=jnp.zeros((), jnp.bool_),
                )
            )
        self.step_options = step_options(cfg)
        self.state_metric_keys = tuple(
            methods.get(name).state_metric[0] for name in self.step_options.state_metrics
        )
        self.state = jax.device_put(_stack(states), self.replicated)

    @property
    def strategy(self) -> str:
        """``"vmap"`` or ``"unroll"``: how the replicas share the step (one replica: unroll)."""
        s = self.cfg.run.replica_strategy
        if len(self.replicas) == 1 or (s == "auto" and self.parallel.platform == "cpu"):
            return "unroll"
        return "vmap" if s == "auto" else s

    def _build_steps(self) -> None:
        n = len(self.replicas)
        # The optimizer's update is the same function for every seed: a seed only reaches
        # tx.init, whose result is in each replica's state.
        step = make_train_step(self.graphdef, self.opt.tx, self.step_options)
        evaluate = make_eval_step(self.eval_graphdef, self.step_options)
        if self.strategy == "vmap":
            train_fn = jax.vmap(step, in_axes=(0, 0, 0, None))
            eval_fn = jax.vmap(evaluate, in_axes=(0, 0, None, None, None, None))
        else:

            def train_fn(state, images, labels, fb):
                outs = [step(_index(state, i), images[i], labels[i], fb) for i in range(n)]
                return _stack([o[0] for o in outs]), _stack([o[1] for o in outs])

            def eval_fn(params, rest, images, labels, weights, fb):
                outs = [
                    evaluate(_index(params, i), _index(rest, i), images, labels, weights, fb)
                    for i in range(n)
                ]
                return _stack(outs)

        repl, rdata, data = self.replicated, self.replica_batch_sharding, self.batch_sharding
        self._train_step = jax.jit(
            train_fn,
            in_shardings=(repl, rdata, rdata, repl),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            eval_fn, in_shardings=(repl, repl, data, data, data, repl), out_shardings=repl
        )
        self._replica_state = jax.jit(_index, static_argnums=1, out_shardings=repl)
        self._grad_fn = self._update_fn = None

    # ------------------------------------------------------------------ public seams
    #
    # What benchmarks and diagnostics use to run *this* run's computation step by step:
    # its data order (batches), its device placement (put_batch), its jitted step
    # (dispatch / train_step), one replica's state and step in two halves (replica_state,
    # grad_fn, update_fn) and the loop itself (train_epoch).

    def replica_state(self, i: int = 0) -> TrainState:
        """The train state of the ``i``-th replica (in seed order), without the replica axis."""
        return self._replica_state(self.state, i)

    def replica_batches(self, epoch: int, start_batch: int = 0, replica: int = 0):
        """The host batches ``(images, labels)`` of ``epoch`` (0-based) in the order of the
        ``replica``-th replica (in seed order).

        The order is a function of ``(seed, epoch)`` only; with several processes each
        one gets its own rows of every global batch.
        """
        from gcgd_jax.data import batch_iterator

        return batch_iterator(
            self.train_ds,
            self.cfg.data.batch_size,
            seed=self.replicas[replica].seed,
            epoch=epoch,
            start_batch=start_batch,
            shard=(jax.process_index(), jax.process_count()),
        )

    def batches(self, epoch: int, start_batch: int = 0):
        """The run's host batches of ``epoch``: ``(images, labels)`` stacked over the
        replicas, shaped ``(replicas, batch, ...)`` (each replica's own order)."""
        its = [self.replica_batches(epoch, start_batch, i) for i in range(len(self.replicas))]
        for batch in zip(*its):
            if len(batch) == 1:  # one replica: a view, no copy
                yield batch[0][0][None], batch[0][1][None]
            else:
                yield np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])

    def put_batch(self, array: np.ndarray) -> jax.Array:
        """This process's rows of a replica-stacked host batch (as :meth:`batches` yields)
        as the device array the step reads (split over the devices along the batch axis)."""
        return self.parallel.put_local(array, replica_axis=True)

    def dispatch(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        """Dispatches one jitted train step on replica-stacked device batches (see
        :meth:`put_batch`) and returns its ``(replicas,)`` metrics as device arrays,
        without waiting for them."""
        self.state, metrics = self._train_step(self.state, images, labels, self.fusion_breaker)
        return metrics

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
        """One jitted train step on replica-stacked host batches (outside the loop);
        returns every replica's metrics."""
        host = host_metrics(self.dispatch(self.put_batch(images), self.put_batch(labels)))
        return [{k: v[i].item() for k, v in host.items()} for i in range(len(self.replicas))]

    @property
    def grad_fn(self):
        """The jitted gradient half of one replica's train step
        (:func:`~gcgd_jax.train.step.make_grad_fn`): ``(state, images, labels,
        fusion_breaker) -> (grads, aux)`` on a :meth:`replica_state` and a batch without the
        replica axis, with the run's loss, augmentation key ``fold_in(state.rng,
        state.step)`` and model."""
        if self._grad_fn is None:
            repl, data = self.replicated, self.batch_sharding
            self._grad_fn = jax.jit(
                make_grad_fn(self.graphdef, self.step_options),
                in_shardings=(repl, data, data, repl),
            )
        return self._grad_fn

    @property
    def update_fn(self):
        """The jitted update half of one replica's train step
        (:func:`~gcgd_jax.train.step.make_update_fn`): ``(state, grads, aux, labels) ->
        (state, metrics)``; ``grad_fn`` then ``update_fn`` is the train step."""
        if self._update_fn is None:
            self._update_fn = jax.jit(make_update_fn(self.opt.tx, self.step_options))
        return self._update_fn

    def train_epoch(
        self, epoch: int, start_step: int | None = None, end_step: int | None = None
    ) -> EpochResult:
        """Runs the loop's steps ``start_step .. end_step - 1`` of ``epoch`` (0-based) without
        checkpoints or metric files, exactly as :meth:`run` does.

        Args:
            epoch: the epoch whose data order is used.
            start_step: global step to start at (default: the epoch's first step).
            end_step: global step to stop before (default: the epoch's end or the run's).
        """
        spe = self.steps_per_epoch
        start = epoch * spe if start_step is None else start_step
        end = min((epoch + 1) * spe, self.total_steps) if end_step is None else end_step
        if not epoch * spe <= start <= end <= (epoch + 1) * spe:
            raise ValueError(
                f"steps {start}..{end} are not inside epoch {epoch} (steps {epoch * spe}.."
                f"{(epoch + 1) * spe})"
            )
        sums = {r: EpochSums() for r in self.replicas}
        step, accounts = self._train_epoch(epoch, start, end, None, sums, record=False)
        first = next(iter(accounts.values()))
        return EpochResult(
            step,
            [a.sums for a in accounts.values()],
            first.times,
            [a.failed for a in accounts.values()],
        )

    # ------------------------------------------------------------------ evaluation

    @property
    def datasets(self) -> tuple[Any, ...]:
        """``(train, eval)``, or ``(train, eval, test)`` with ``train.final_test``: the data
        sets this trainer reads, to hand to another trainer of the same configuration."""
        return (self.train_ds, self.eval_ds, *(() if self.test_ds is None else (self.test_ds,)))

    def eval_batches(self, ds: Any = None):
        """The evaluation split (or ``ds``) as device batches ``(images, labels, weights)``
        of the compiled size (every replica reads the same ones): the last one is padded,
        its padding weighted 0."""
        ds = self.eval_ds if ds is None else ds
        bs = self.eval_batch_size
        put = self.parallel.put_global
        for start in range(0, len(ds.labels), bs):
            images = ds.images[start : start + bs]
            labels = ds.labels[start : start + bs]
            weights = np.ones(len(labels), np.float32)
            if len(labels) < bs:  # pad the last batch to the compiled shape
                pad = bs - len(labels)
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
                weights = np.concatenate([weights, np.zeros(pad, np.float32)])
            yield put(images), put(labels), put(weights)

    def evaluate(self, ds: Any = None, prefix: str | None = None) -> list[dict[str, float]]:
        """Loss and accuracy of every replica (in seed order) on the evaluation split (or
        on ``ds``, its keys named ``prefix``) with the current state."""
        ds = self.eval_ds if ds is None else ds
        prefix = self.eval_prefix if prefix is None else prefix
        bs = self.eval_batch_size
        n = len(ds.labels)
        totals = None
        bar = ProgressBar(
            -(-n // bs),
            bs,
            f"evaluating on {prefix}",
            enabled=self.cfg.log.progress and self.is_main,
            stream=self.stream,
        )
        t0 = time.perf_counter()
        first = not self._eval_compiled
        if first:
            self._note("compiling the evaluation step (XLA) ...")
        state: TrainState = self.state
        for done, (images, labels, weights) in enumerate(self.eval_batches(ds), 1):
            out = self._eval_step(
                state.params, state.rest, images, labels, weights, self.fusion_breaker
            )
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            if first:
                jax.block_until_ready(out)
                self._eval_compiled, first = True, False
                self._note(f"evaluation step compiled in {time.perf_counter() - t0:.1f} s")
            if bar.enabled:  # the first replica's running loss
                seen = float(host_value(totals["count"])[0])
                loss = float(host_value(totals["loss_sum"])[0]) / max(seen, 1.0)
                bar.update(done, loss, min(n, done * bs) / max(time.perf_counter() - t0, 1e-9))
        bar.close()
        host = {k: np.asarray(v, np.float64) for k, v in host_metrics(totals).items()}
        return [
            {
                f"{prefix}_loss": float(host["loss_sum"][i] / max(host["count"][i], 1.0)),
                f"{prefix}_acc": float(host["correct"][i] / max(host["count"][i], 1.0)),
            }
            for i in range(len(self.replicas))
        ]

    def final_test(self) -> list[dict[str, float] | None]:
        """``train.final_test``: every replica's ``final_test_loss`` / ``final_test_acc`` with
        the current state (in seed order, each logged in its ``run.log``); ``None`` each when
        not asked for."""
        if self.test_ds is None:
            return [None] * len(self.replicas)
        t0 = time.perf_counter()
        results = self.evaluate(self.test_ds, "test")
        seconds = time.perf_counter() - t0
        for r, result in zip(self.replicas, results, strict=True):
            self._note(
                f"final test ({len(self.test_ds.labels)} examples, {seconds:.1f} s): "
                f"loss {result['test_loss']:.4f}, acc {100 * result['test_acc']:.2f}%",
                r,
            )
        return [{f"final_{k}": v for k, v in result.items()} for result in results]

    # ------------------------------------------------------------------ checkpoints

    def _checkpointer(self, r: Replica) -> Checkpointer | None:
        if not self.cfg.checkpoint.enabled:
            return None
        return Checkpointer(r.out / "checkpoints", keep=self.cfg.checkpoint.keep)

    def _meta(self, r: Replica, step: int, sums: EpochSums) -> dict[str, Any]:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "sums": dataclasses.asdict(sums),
            "config": config_to_dict(r.cfg),
        }

    def _save(self, r: Replica, step: int, sums: EpochSums, state: TrainState | None = None):
        """A checkpoint of the replica's state (or of ``state``) at ``step``."""
        if r.ckpt is None:
            return
        state = self.replica_state(r.index) if state is None else state
        r.ckpt.save(step, state._asdict(), self._meta(r, step, sums))

    def _restore(self) -> int:
        """Restores every replica at one common step (the replicas step in lockstep) and
        returns it (0 from scratch)."""
        initial = [self.replica_state(r.index) for r in self.replicas]
        max_step = None
        while True:
            found = [self._restore_one(r, s, max_step) for r, s in zip(self.replicas, initial)]
            steps = [step for step, _, _ in found]
            if len(set(steps)) == 1:
                break
            max_step = min(steps)
            self._note(
                f"seed-parallel: the replicas' newest checkpoints differ (steps "
                f"{', '.join(map(str, steps))}); resuming all from step {max_step}"
            )
        for r, (_, sums, _) in zip(self.replicas, found):
            r.sums = sums
        if any(r.resumed_from is not None for r in self.replicas):
            self.state = jax.device_put(_stack([s for _, _, s in found]), self.replicated)
        return steps[0]

    def _restore_one(
        self, r: Replica, initial: TrainState, max_step: int | None
    ) -> tuple[int, EpochSums, TrainState]:
        """The replica's newest readable checkpoint of step <= ``max_step`` (when given):
        ``(step, sums, state)``; ``(0, EpochSums(), initial)`` from scratch."""
        r.resumed_from = None
        if not self.resume:
            return 0, EpochSums(), initial
        folder = r.out / "checkpoints"
        if r.ckpt is None:
            if read_metrics(r.out / "metrics.jsonl"):
                raise ConfigError(
                    f"cannot resume {r.out}: checkpoint.enabled = false, so there is no "
                    "checkpoint to continue from, and starting again would discard its "
                    "metrics.jsonl; pass --overwrite to start again, or choose another --out"
                )
            self._note(f"note: checkpoints are disabled; starting {r.out} from scratch", r)
            return 0, EpochSums(), initial
        found, damaged = r.ckpt.newest_readable(initial._asdict(), max_step)
        if found is None and damaged:
            raise CheckpointError(self._unreadable_message(r, damaged))
        if found is None:
            self._note(f"note: no checkpoint in {folder}; starting from scratch", r)
            return 0, EpochSums(), initial
        step, state, meta = found
        saved_cfg = config_from_dict(meta["config"])
        changed = [
            k
            for k in config_diff(saved_cfg, r.cfg)
            if k not in _RESUMABLE_CHANGES and not k.startswith(("checkpoint.", "log."))
        ]
        if changed:
            saved, now = flat_config(saved_cfg), flat_config(r.cfg)
            details = ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in changed)
            raise ConfigError(
                f"cannot resume {r.out}: the configuration differs from the checkpointed run in "
                f"{details}; resume with the run's own configuration ({r.out / 'config.toml'}) "
                "or start a new --out"
            )
        for d in damaged:  # newer than `step`; kept beside the steps, out of the way
            moved = r.ckpt.set_aside(d)
            self._note(
                f"warning: the checkpoint at step {d.step} is unreadable ({d.reason}); "
                f"moved it to {moved} and fell back to the older checkpoint at step {step}",
                r,
            )
        r.resumed_from = step
        self._note(
            f"resumed from checkpoint at step {step} (epoch {step // self.steps_per_epoch + 1})",
            r,
        )
        return step, EpochSums.from_checkpoint(meta["sums"]), TrainState(**state)

    def _unreadable_message(self, r: Replica, damaged: list[DamagedCheckpoint]) -> str:
        steps = ", ".join(str(d.step) for d in damaged)
        details = "; ".join(f"step {d.step} ({d.path}): {d.reason}" for d in damaged)
        return (
            f"cannot resume {r.out}: no checkpoint can be read (damaged: step {steps}). "
            f"{details}. Nothing in {r.out} was changed. Put back an intact copy of a "
            "checkpoint folder, or start the run again with --overwrite (replaces its "
            "metrics and checkpoints) or with another --out"
        )

    # ------------------------------------------------------------------ loop

    def run(self, *, stop_at_step: int | None = None) -> dict[int, dict[str, Any]]:
        """Trains every unfinished replica to the end (or to ``stop_at_step``) and returns
        the summary record of each seed (``{seed: summary}``, in seed order; a finished
        replica's is read from its folder); the folders' locks are released when it
        returns or raises (:meth:`close`).

        ``stop_at_step`` ends the run after that global step *without* saving,
        as if the process were killed there (for tests of resumption).

        Raises:
            NonFiniteLossError: a replica stopped on a non-finite loss under
                ``nan_policy = "stop"`` (raised after the others finished; its folder
                keeps a checkpoint of its last good state).
            KeyboardInterrupt: re-raised after naming the newest checkpoint
                (resume from it with ``resume=True``).
        """
        try:
            return self._run(stop_at_step)
        finally:
            self.close()

    def _run(self, stop_at_step: int | None) -> dict[int, dict[str, Any]]:
        summaries: dict[int, dict[str, Any]] = {}
        if self.seed_parallel and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(self.cfg))
        if self.finished:
            done = ", ".join(f"s{seed} ({status})" for seed, status in self.finished.items())
            self._note(f"seed-parallel: already finished, left as they are: {done}")
        if not self.replicas:
            return self._with_finished(summaries)
        try:
            for r in self.replicas:
                r.out.mkdir(parents=True, exist_ok=True)
                r.ckpt = self._checkpointer(r)
            step = self._restore()
            for r in self.replicas:
                r.writer = self._begin(r, step)
                r.start_step = step
        except BaseException:
            self._close_files()
            raise
        n = len(self.replicas)
        run_start = time.perf_counter()
        for r in self.replicas:
            self._note(self._start_line(r), r)
        if self.seed_parallel:
            self._note(
                f"seed-parallel: {n} replica(s) (seeds {', '.join(str(s) for s in self.seeds)})"
                f" in one step ({self.strategy})"
            )
        status = "completed"
        try:
            while step < self.total_steps and self._live():
                epoch = step // self.steps_per_epoch
                epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
                t0 = time.perf_counter()
                sums = {r: r.sums for r in self._live()}
                step, accounts = self._train_epoch(epoch, step, epoch_end, stop_at_step, sums)
                for r, account in accounts.items():
                    if account.failed is not None:
                        r.stopped = self._stop_nonfinite(r, account.failed, r.sums)
                        if self.seed_parallel:
                            self._note(str(r.stopped), r)
                if step < epoch_end and self._live():  # stop_at_step reached inside the epoch
                    status = "stopped"
                    break
                self._end_epoch(epoch, step, accounts, t0)
                if stop_at_step is not None and step >= stop_at_step:
                    status = "stopped" if step < self.total_steps else status
                    break
            wall = time.perf_counter() - run_start
            live = self._live()
            finals = self.final_test() if status == "completed" and live else [None] * n
            for r in live:
                summary = self._summary(r, status, step, wall, finals[r.index])
                if self.seed_parallel:
                    summary["replicas"] = n
                summaries[r.seed] = summary
                if status == "completed" and self.is_main:
                    r.writer.write(summary)
                    self._log(r, self._table(r.out))
        except KeyboardInterrupt:
            steps = [r.ckpt.steps() for r in self.replicas if r.ckpt is not None]
            last = min(s[-1] for s in steps) if steps and all(steps) else None
            where = (
                "every replica has a checkpoint"
                if self.seed_parallel
                else "the newest checkpoint is"
            )
            self._note(
                "interrupted; "
                + (
                    f"{where} at step {last} (continue with --resume)"
                    if last is not None
                    else "no checkpoint was saved yet"
                )
            )
            raise
        finally:
            self._close_files()
        stopped = [r for r in self.replicas if r.stopped is not None]
        if stopped and not self.seed_parallel:
            raise stopped[0].stopped
        if stopped:
            seeds = ", ".join(str(r.seed) for r in stopped)
            raise NonFiniteLossError(
                f"seed(s) {seeds} stopped on a non-finite loss (each folder keeps its last good "
                f"state and says where: {stopped[0].stopped}); the other replicas completed"
            )
        return self._with_finished(summaries)

    def _live(self) -> list[Replica]:
        """The replicas that did not stop on a non-finite loss."""
        return [r for r in self.replicas if r.stopped is None]

    def _close_files(self) -> None:
        for r in self.replicas:
            if r.writer is not None:
                r.writer.close()
            if r.ckpt is not None:
                r.ckpt.close()

    def _with_finished(self, summaries: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """``summaries`` and the summary record of every replica that had already finished,
        in seed order."""
        for seed in self.finished:
            summaries[seed] = read_metrics(replica_dir(self.out, seed) / "metrics.jsonl")[-1]
        return {seed: summaries[seed] for seed in self.seeds if seed in summaries}

    def _begin(self, r: Replica, step: int) -> MetricsWriter:
        """Opens the replica's files at ``step``: config.toml, metrics.jsonl (cut back to
        ``step`` when resuming, with a resume record), the ignored-options note."""
        cfg = r.cfg
        if self.is_main:
            (r.out / "config.toml").write_text(to_toml(cfg))
        metrics = MetricsWriter(
            r.out / "metrics.jsonl",
            resume_step=step if self.resume else None,
            tensorboard=cfg.log.tensorboard,
            enabled=self.is_main,
        )
        if r.resumed_from is not None and self.is_main:
            metrics.write(
                {
                    "kind": "resume",
                    "step": step,
                    "epoch": step // self.steps_per_epoch + 1,
                    "checkpoint": str(r.out / "checkpoints" / str(step)),
                }
            )
        note = ignored_options_note(cfg)
        if note is not None:
            self._note(note, r)
        return metrics

    def _start_line(self, r: Replica) -> str:
        cfg = self.cfg
        return (
            f"gcgd-train: {cfg.model.name} on {cfg.data.name} (train {len(self.train_ds.labels)}, "
            f"{self.eval_prefix} {len(self.eval_ds.labels)}), {self.num_params:,} parameters; "
            f"{self.total_steps} steps = {self.num_epochs} epoch(s) x {self.steps_per_epoch}, "
            f"batch {cfg.data.batch_size} on {len(self.devices)} {self.devices[0].platform} "
            f"device(s); out {r.out}"
        )

    def _evaluates_after(self, epoch: int, step: int) -> bool:
        """Whether the run evaluates at the end of ``epoch`` (0-based), reached at ``step``."""
        return (epoch + 1) % self.cfg.train.eval_every_epochs == 0 or step >= self.total_steps

    def _end_epoch(self, epoch: int, step: int, accounts: dict, t0: float) -> None:
        """For every replica that trained on: evaluation, the epoch record, the epoch-end
        checkpoint (in that order)."""
        live = [r for r, a in accounts.items() if a.failed is None]
        train_time = time.perf_counter() - t0
        evaluation: list[dict[str, float]] | None = None
        seconds = 0.0
        if live and self._evaluates_after(epoch, step):
            t1 = time.perf_counter()
            evaluation = self.evaluate()  # every replica at once
            seconds = time.perf_counter() - t1
        cfg = self.cfg
        every_e, every_s = cfg.checkpoint.every_epochs, cfg.checkpoint.every_steps
        save = (
            step >= self.total_steps
            or (every_e and (epoch + 1) % every_e == 0)
            or (every_s and step % every_s == 0)
        )
        for r in live:
            account = accounts[r]
            record = self._epoch_record(epoch, step, account.sums, account.times, train_time)
            if evaluation is not None:
                record.update(evaluation[r.index])
                record["eval_time"] = seconds
            record["epoch_time"] = time.perf_counter() - t0
            # The record is written before the checkpoint: a run killed in between resumes
            # from the previous checkpoint, and the record is cut off and written again.
            if self.is_main:
                r.writer.write(record)
            self._note(self._epoch_line(record), r)
            if save:
                self._save(r, step, EpochSums())
            r.sums = EpochSums()

    def _train_epoch(
        self,
        epoch: int,
        step: int,
        epoch_end: int,
        stop_at_step: int | None,
        sums: dict[Replica, EpochSums],
        record: bool = True,
    ) -> tuple[int, dict[Replica, EpochAccount]]:
        """Steps ``step .. epoch_end-1``, accounting for the replicas of ``sums`` (the live
        ones) in their sums; with ``record`` into their TensorBoard writers and checkpoints
        every ``checkpoint.every_steps``. Returns the step reached and each replica's
        account."""
        cfg = self.cfg
        spe, bs = self.steps_per_epoch, cfg.data.batch_size
        start_batch = step - epoch * spe
        batches = self.batches(epoch, start_batch)
        live = list(sums)
        label = f"epoch {epoch + 1}/{self.num_epochs}"
        if self.seed_parallel:
            label += f" (s{live[0].seed} of {len(self.replicas)})"
        bar = ProgressBar(
            epoch_end - epoch * spe,
            bs,
            label,
            enabled=cfg.log.progress and self.is_main,
            stream=self.stream,
        )
        off = ProgressBar(0, bs, "", enabled=False)
        accounts = {
            r: EpochAccount(
                self,
                epoch,
                start_batch,
                s,
                bar if r is live[0] else off,
                r.writer if record else None,
            )
            for r, s in sums.items()
        }

        def complete(metrics, done_step):
            host = host_metrics(metrics)
            for r, account in accounts.items():
                account.complete({k: v[r.index] for k, v in host.items()}, done_step)

        def dispatch():
            images, labels = next(batches)
            first = not self._train_compiled
            if first:
                self._note(self._compiling_note())
                t_compile = time.perf_counter()
            metrics = self.dispatch(self.put_batch(images), self.put_batch(labels))
            if first:
                jax.block_until_ready(metrics)
                self._train_compiled = True
                self.first_step_s = time.perf_counter() - t_compile
                self._note(f"train step compiled; first step done in {self.first_step_s:.1f} s")
                for account in accounts.values():
                    account.restart_clock()  # speeds exclude the compilation
            return metrics

        def save(at: int) -> None:
            for r, account in accounts.items():
                if account.failed is None:
                    self._save(r, at, account.sums)

        step = run_steps(
            step,
            epoch_end,
            dispatch=dispatch,
            complete=complete,
            failed=lambda: all(a.failed is not None for a in accounts.values()),
            save=save,
            every=cfg.checkpoint.every_steps if record else 0,
            stop_at_step=stop_at_step,
        )
        bar.close()
        return step, accounts

    def _compiling_note(self) -> str:
        if self.seed_parallel:
            return (
                f"compiling the seed-parallel train step ({len(self.replicas)} replicas, "
                f"{self.strategy}; XLA) ..."
            )
        return "compiling the train step (XLA; this takes a while the first time) ..."

    def _stop_nonfinite(self, r: Replica, failed, sums: EpochSums) -> NonFiniteLossError:
        """Keeps the replica's last good state (checkpoint) and writes its non-finite
        summary record; returns the error to raise."""
        bad_step, loss = failed
        sums.skipped = 0
        # The step guard left the state at the last good one; only its counters moved on.
        good = self.replica_state(r.index)._replace(
            step=jnp.asarray(bad_step, jnp.int32),
            nonfinite=jnp.zeros((), jnp.int32),
            halted=jnp.zeros((), jnp.bool_),
        )
        good = jax.device_put(good, self.replicated)
        self._save(r, bad_step, sums, good)
        epoch, batch = divmod(bad_step, self.steps_per_epoch)
        kept = (
            f"a checkpoint of the last good state (step {bad_step}) is in {r.out / 'checkpoints'}"
            if r.ckpt is not None
            else "checkpoints are disabled, so no state was kept"
        )
        record = {
            "kind": "summary",
            "status": "nonfinite",
            "step": bad_step,
            "epoch": epoch + 1,
            "batch": batch,
            "loss": loss,
        }
        if self.is_main:
            r.writer.write(record)
        return NonFiniteLossError(
            f"non-finite loss ({loss}) at step {bad_step + 1} (epoch {epoch + 1}, batch {batch + 1}); "
            f"training stopped and {kept}. Lower optim.lr, or set train.nan_policy=skip to skip "
            "such steps."
        )

    def _epoch_record(self, epoch, step, sums, times, train_time) -> dict[str, Any]:
        bs = self.cfg.data.batch_size
        median = statistics.median(times) if times else None
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "lr": sums.lr,
            "train_loss": sums.loss / sums.steps if sums.steps else None,
            "train_acc": sums.correct / sums.examples if sums.examples else None,
            "train_time": train_time,
            "step_time_median": median,
            "images_per_s": bs / median if median else None,
            "skipped_steps": sums.skipped,
        }
        for key, reduction in self.step_options.aux.metrics:  # e.g. gc_ode_loss, gc_ode_gate
            value = sums.model_aux.get(key)
            if reduction == "mean":
                value = value / sums.steps if value is not None and sums.steps else None
            record[key] = value
        for key in self.state_metric_keys:  # last step's value (e.g. gc_w_predictor_loss)
            record[key] = sums.state_metrics.get(key)
        return record

    def _epoch_line(self, r: dict[str, Any]) -> str:
        parts = [f"epoch {r['epoch']}/{self.num_epochs}", f"step {r['step']}"]
        for key, fmt in (
            ("train_loss", "train loss {:.4f}"),
            ("train_acc", "acc {:.4f}"),
            (f"{self.eval_prefix}_loss", self.eval_prefix + " loss {:.4f}"),
            (f"{self.eval_prefix}_acc", "acc {:.4f}"),
            ("images_per_s", "{:.0f} img/s"),
            ("epoch_time", "{:.1f} s"),
        ):
            if r.get(key) is not None:
                parts.append(fmt.format(r[key]))
        return " | ".join(parts)

    def _summary(
        self,
        r: Replica,
        status: str,
        step: int,
        wall: float,
        final_test: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        records = [x for x in read_metrics(r.out / "metrics.jsonl") if x.get("kind") == "epoch"]
        key = f"{self.eval_prefix}_acc"
        evaluated = [x for x in records if x.get(key) is not None]
        best = max(evaluated, key=lambda x: x[key]) if evaluated else None
        speeds = [x["images_per_s"] for x in records if x.get("images_per_s")]
        return {
            "kind": "summary",
            "status": status,
            "name": r.cfg.run.name,
            "step": step,
            "resumed_from_step": r.resumed_from,
            "steps_run": step - r.start_step,
            "epochs": len(records),
            f"final_{self.eval_prefix}_loss": evaluated[-1][f"{self.eval_prefix}_loss"]
            if evaluated
            else None,
            f"final_{key}": evaluated[-1][key] if evaluated else None,
            f"best_{key}": best[key] if best else None,
            "best_epoch": best["epoch"] if best else None,
            **(final_test or {}),
            "nonfinite_steps": int(host_value(self.state.nonfinite)[r.index]),
            "images_per_s_median": statistics.median(speeds) if speeds else None,
            "wall_time": wall,
            "devices": len(self.devices),
            "platform": self.devices[0].platform,
        }

    def _table(self, out: Path) -> str:
        records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "epoch"]
        return summary_table(records, self.eval_prefix)

    def summary_table(self) -> str:
        """The epoch table of the run so far (of each seed, one after the other, in a
        seed-parallel run)."""
        if not self.seed_parallel:
            return self._table(self.out)
        parts = []
        for seed in self.seeds:
            folder = replica_dir(self.out, seed)
            parts += [f"seed {seed} ({folder}):", self._table(folder)]
        return "\n".join(parts)


def train(cfg: TrainConfig, **kwargs: Any) -> dict[int, dict[str, Any]]:
    """``Trainer(cfg, **kwargs).run()``: trains and returns ``{seed: summary record}``."""
    return Trainer(cfg, **kwargs).run()
