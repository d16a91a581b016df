"""The training loop: data, model, optimizer, jitted steps, evaluation, checkpoints.

:class:`Trainer` runs one configuration into an output folder::

    <out>/config.toml      the resolved configuration (re-usable with --config)
    <out>/metrics.jsonl    one record per epoch, then a summary record
    <out>/checkpoints/     orbax checkpoints (see gcgd_jax.train.checkpoint)

Data parallelism: a 1-D mesh ``('data',)`` over the devices (all of them by
default, ``run.num_devices`` to use fewer), the train state replicated
(``NamedSharding(mesh, P())``), batches split along their first axis
(``P('data')``), one ``jax.jit`` step; XLA inserts the gradient all-reduce and
computes BatchNorm statistics over the whole global batch, so the result
equals the single-device step up to the order of floating-point sums. With
``run.distributed = true``, ``jax.distributed.initialize()`` runs first and
each process feeds its slice of every global batch.

Exact resumption: the data order of an epoch is a function of
``(run.seed, epoch)``, the augmentation key of a step is
``fold_in(rng, step)``, and a checkpoint stores the full state (parameters,
BatchNorm statistics, optimizer and GC-W state, counters) and the running
sums of the epoch's train metrics, so a resumed run computes the same numbers
as one that never stopped; ``metrics.jsonl`` is cut back to the checkpoint's
step on resume. Timing fields naturally differ. A resumed process says where
it started: a note on the stream, a ``{"kind": "resume", "step": ...}``
record in ``metrics.jsonl`` and ``resumed_from_step`` / ``steps_run`` in the
summary record.

Damaged checkpoints: with ``resume=True`` the newest checkpoint that restores
is used; newer unreadable ones are moved aside (``<step>.damaged``, with a
note naming them). When none restores, :class:`CheckpointError` names every
damaged step and nothing in the output folder is changed (the CLI exits 2).

Steps are dispatched one ahead: the host prepares and dispatches step ``i+1``
before it reads step ``i``'s metrics, so the device never waits for Python.

Public seams, for benchmarks and diagnostics that must compute exactly what a run
computes: :meth:`Trainer.batches` (the run's data order), :meth:`Trainer.put_batch`,
:meth:`Trainer.dispatch` / :meth:`Trainer.train_step` (the jitted step),
:attr:`Trainer.grad_fn` and :attr:`Trainer.update_fn` (the step's two halves) and
:meth:`Trainer.train_epoch` (the loop, with an ``on_step`` hook). What a
configuration builds (data, model, step options) is in :mod:`gcgd_jax.train.build`,
the device mesh in :mod:`gcgd_jax.train.devices`.
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
    "Trainer",
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
    """What :meth:`Trainer.train_epoch` returns."""

    step: int  # the global step reached
    sums: EpochSums
    step_times: list[float]  # completion-to-completion seconds of each step after the first
    failed: tuple[int, float] | None  # (step, loss) of a non-finite step under "stop"


def host_metrics(metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """A step's metrics (device arrays) as host arrays (this waits for the step)."""
    return {k: host_value(v) for k, v in metrics.items()}


class EpochAccount:
    """One run's bookkeeping of the completed steps of an epoch.

    :meth:`complete` takes a step's metrics as host values (in step order) and
    adds them to the epoch's :class:`EpochSums`, records the step time, notices
    a non-finite step (``failed`` under ``train.nan_policy = "stop"``; later
    steps are ignored), and drives the progress bar, the TensorBoard scalars
    and the ``on_step`` hook. A seed-parallel run keeps one per replica.
    """

    def __init__(self, trainer: Trainer, epoch, start_batch, sums, bar, writer=None, on_step=None):
        self.trainer, self.epoch, self.start_batch = trainer, epoch, start_batch
        self.sums, self.bar, self.writer, self.on_step = sums, bar, writer, on_step
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
        for key in trainer._state_metric_keys:
            sums.state_metrics[key] = float(m[key])
        done = done_step - self.epoch * trainer.steps_per_epoch
        speed = (done - self.start_batch) * bs / max(now - self._t_start, 1e-9)
        self.bar.update(done, sums.loss / max(sums.steps, 1), speed)
        if self.on_step is not None:
            self.on_step(done_step, {k: v.item() for k, v in m.items()})
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
    """The step loop of an epoch, shared by single and seed-parallel runs.

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


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains ``cfg`` into ``out_dir``.

    Args:
        cfg: a validated configuration.
        out_dir: the output folder (default ``cfg.run.out_dir``).
        resume: continue from the newest readable checkpoint in ``out_dir``
            (start from scratch, with a note, when none was saved yet).
        overwrite: delete an earlier run's metrics and checkpoints in ``out_dir``.
        stream: where progress and notes go (stderr by default).
        datasets: ``(train, eval)`` data sets already built for this configuration
            (:func:`gcgd_jax.train.build.load_data`), or ``(train, eval, test)`` with
            ``train.final_test``'s test split (:func:`~gcgd_jax.train.build.load_final_test`);
            None loads them.

    Raises:
        ConfigError: invalid settings found while building (data, model,
            correction options, batch size vs devices, resuming a different config).
        RunFolderBusy: another live process is writing ``out_dir`` (a ``ConfigError``).
    """

    resumed_from: int | None = None  # the checkpoint step run() continued from

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
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output folder {self.out} is a file; choose another --out")
        self.resume = resume
        self.stream = stream if stream is not None else sys.stderr
        if cfg.log.tensorboard and not tensorboard_available():
            raise ConfigError(TENSORBOARD_MISSING)
        self._train_compiled = self._eval_compiled = False
        self._setup_devices()  # first: jax.distributed decides which process writes
        # One writer per run folder, from before anything in it is touched (--overwrite
        # deletes) until the run ends: a second live process gets RunFolderBusy.
        self._lock = RunLock(self.out) if self.is_main else None
        try:
            self._check_out_dir(overwrite)
            self._setup_data(datasets)
            self._setup_model_and_optimizer()
            self._build_steps()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the run folder's lock (:mod:`gcgd_jax.train.lock`); :meth:`run` does
        this when it ends. The process exiting releases it too, however it exits."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the only one that writes files and prints."""
        return jax.process_index() == 0

    def _note(self, message: str) -> None:
        """A line on the stream and in ``<out>/run.log`` (process 0 only)."""
        if self.is_main:
            self.stream.write(message + "\n")
            self.stream.flush()
            self._log(message)

    def _log(self, text: str) -> None:
        """Appends ``text`` to ``<out>/run.log`` (process 0 only)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "run.log").open("a") as f:
                f.write(text + "\n")

    def _check_out_dir(self, overwrite: bool) -> None:
        metrics = self.out / "metrics.jsonl"
        ckpts = self.out / "checkpoints"
        if overwrite:
            if self.is_main:
                metrics.unlink(missing_ok=True)
                (self.out / "run.log").unlink(missing_ok=True)
                shutil.rmtree(ckpts, ignore_errors=True)
        elif not self.resume and (metrics.exists() or ckpts.exists()):
            raise ConfigError(
                f"output folder {self.out} already holds a run; pass --resume to continue it, "
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
        fb = run.fusion_breaker
        self.use_fusion_breaker = fb == "on" or (fb == "auto" and self.parallel.platform == "cpu")

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
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels)
        model.train()
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
        model.train()
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        self.opt = build_optimizer(
            cfg,
            params=params,
            model=model,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
        self.step_options = step_options(cfg, fusion_breaker=self.use_fusion_breaker)
        self._state_metric_keys = tuple(
            methods.get(name).state_metric[0] for name in self.step_options.state_metrics
        )
        state = TrainState(
            params=params,
            rest=rest,
            opt_state=self.opt.tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.fold_in(jax.random.PRNGKey(cfg.run.seed), 1),
            nonfinite=jnp.zeros((), jnp.int32),
            halted=jnp.zeros((), jnp.bool_),
        )
        self.state = jax.device_put(state, self.replicated)

    def _build_steps(self) -> None:
        repl, data = self.replicated, self.batch_sharding
        self._train_step = jax.jit(
            make_train_step(self.graphdef, self.opt.tx, self.step_options),
            in_shardings=(repl, data, data, repl),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            make_eval_step(self.eval_graphdef, self.step_options),
            in_shardings=(repl, repl, data, data, data, repl),
            out_shardings=repl,
        )
        self.fusion_breaker = jax.device_put(jnp.float32(1.0), repl)
        self._grad_fn = self._update_fn = None

    # ------------------------------------------------------------------ public seams
    #
    # What benchmarks and diagnostics use to run *this* run's computation step by step:
    # its data order (batches), its device placement (put_batch), its jitted step
    # (dispatch / train_step), the step split into gradient and update (grad_fn,
    # update_fn) and the loop itself with a per-step hook (train_epoch).

    def batches(self, epoch: int, start_batch: int = 0):
        """The host batches ``(images, labels)`` of ``epoch`` (0-based) in the run's order.

        The order is a function of ``(run.seed, epoch)`` only; with several
        processes each one gets its own rows of every global batch.
        """
        from gcgd_jax.data import batch_iterator

        return batch_iterator(
            self.train_ds,
            self.cfg.data.batch_size,
            seed=self.cfg.run.seed,
            epoch=epoch,
            start_batch=start_batch,
            shard=(jax.process_index(), jax.process_count()),
        )

    def put_batch(self, array: np.ndarray) -> jax.Array:
        """A global host batch (the same on every process) as a batch-sharded device array."""
        return self.parallel.put_global(array)

    def dispatch(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        """Dispatches one jitted train step on device batches (see :meth:`put_batch`) and
        returns its metrics as device arrays, without waiting for them."""
        self.state, metrics = self._train_step(self.state, images, labels, self.fusion_breaker)
        return metrics

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """One jitted train step on a host batch (outside the loop); returns its metrics."""
        metrics = self.dispatch(self.put_batch(images), self.put_batch(labels))
        return {k: host_value(v).item() for k, v in metrics.items()}

    @property
    def grad_fn(self):
        """The jitted gradient half of the train step (:func:`~gcgd_jax.train.step.make_grad_fn`):
        ``(state, images, labels, fusion_breaker) -> (grads, aux)``, with the run's loss,
        augmentation key ``fold_in(state.rng, state.step)`` and model."""
        if self._grad_fn is None:
            repl, data = self.replicated, self.batch_sharding
            self._grad_fn = jax.jit(
                make_grad_fn(self.graphdef, self.step_options),
                in_shardings=(repl, data, data, repl),
            )
        return self._grad_fn

    @property
    def update_fn(self):
        """The jitted update half of the train step (:func:`~gcgd_jax.train.step.make_update_fn`):
        ``(state, grads, aux, labels) -> (state, metrics)``; ``grad_fn`` then ``update_fn``
        is the train step."""
        if self._update_fn is None:
            self._update_fn = jax.jit(make_update_fn(self.opt.tx, self.step_options))
        return self._update_fn

    def train_epoch(
        self,
        epoch: int,
        start_step: int | None = None,
        end_step: int | None = None,
        *,
        on_step=None,
    ) -> EpochResult:
        """Runs the loop's steps ``start_step .. end_step - 1`` of ``epoch`` (0-based) without
        checkpoints or metric files, exactly as :meth:`run` does.

        Args:
            epoch: the epoch whose data order is used.
            start_step: global step to start at (default: the epoch's first step).
            end_step: global step to stop before (default: the epoch's end or the run's).
            on_step: called as ``on_step(step, metrics)`` after each completed step
                (``metrics``: that step's values as Python scalars).
        """
        spe = self.steps_per_epoch
        start = epoch * spe if start_step is None else start_step
        end = min((epoch + 1) * spe, self.total_steps) if end_step is None else end_step
        if not epoch * spe <= start <= end <= (epoch + 1) * spe:
            raise ValueError(
                f"steps {start}..{end} are not inside epoch {epoch} (steps {epoch * spe}.."
                f"{(epoch + 1) * spe})"
            )
        return self._train_epoch(epoch, start, end, EpochSums(), None, None, on_step=on_step)

    # ------------------------------------------------------------------ evaluation

    @property
    def datasets(self) -> tuple[Any, ...]:
        """``(train, eval)``, or ``(train, eval, test)`` with ``train.final_test``: the data
        sets this trainer reads, to hand to another trainer of the same configuration."""
        return (self.train_ds, self.eval_ds, *(() if self.test_ds is None else (self.test_ds,)))

    def eval_batches(self, ds: Any = None):
        """The evaluation split (or ``ds``) as device batches ``(images, labels, weights)``
        of the compiled size: the last one is padded, its padding weighted 0."""
        ds = self.eval_ds if ds is None else ds
        bs = self.eval_batch_size
        for start in range(0, len(ds.labels), bs):
            images = ds.images[start : start + bs]
            labels = ds.labels[start : start + bs]
            weights = np.ones(len(labels), np.float32)
            if len(labels) < bs:  # pad the last batch to the compiled shape
                pad = bs - len(labels)
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
                weights = np.concatenate([weights, np.zeros(pad, np.float32)])
            yield self.put_batch(images), self.put_batch(labels), self.put_batch(weights)

    def evaluate(self, ds: Any = None, prefix: str | None = None) -> dict[str, float]:
        """Loss and accuracy on the evaluation split (or on ``ds``, its keys named
        ``prefix``) with the current state."""
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
        for done, (images, labels, weights) in enumerate(self.eval_batches(ds), 1):
            out = self._eval_step(
                self.state.params, self.state.rest, images, labels, weights, self.fusion_breaker
            )
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            if first:
                jax.block_until_ready(out)
                self._eval_compiled, first = True, False
                self._note(f"evaluation step compiled in {time.perf_counter() - t0:.1f} s")
            if bar.enabled:
                seen = float(host_value(totals["count"]))
                loss = float(host_value(totals["loss_sum"])) / max(seen, 1.0)
                bar.update(done, loss, min(n, done * bs) / max(time.perf_counter() - t0, 1e-9))
        bar.close()
        totals = {k: float(host_value(v)) for k, v in totals.items()}
        count = max(totals["count"], 1.0)
        return {
            f"{prefix}_loss": totals["loss_sum"] / count,
            f"{prefix}_acc": totals["correct"] / count,
        }

    def _checkpointer(self) -> Checkpointer | None:
        if not self.cfg.checkpoint.enabled:
            return None
        return Checkpointer(self.out / "checkpoints", keep=self.cfg.checkpoint.keep)

    def _meta(self, step: int, sums: EpochSums) -> dict[str, Any]:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "sums": dataclasses.asdict(sums),
            "config": config_to_dict(self.cfg),
        }

    def _save(
        self, ckpt: Checkpointer | None, step: int, sums: EpochSums, state: TrainState | None = None
    ) -> None:
        if ckpt is None:
            return
        state = self.state if state is None else state
        ckpt.save(step, state._asdict(), self._meta(step, sums))

    def _restore(
        self, ckpt: Checkpointer | None, max_step: int | None = None
    ) -> tuple[int, EpochSums]:
        """Loads the newest readable checkpoint (of step <= ``max_step`` when given) into
        ``self.state``; returns ``(step, sums)`` (``(0, EpochSums())`` from scratch)."""
        if not self.resume:
            return 0, EpochSums()
        folder = self.out / "checkpoints"
        if ckpt is None:
            if read_metrics(self.out / "metrics.jsonl"):
                raise ConfigError(
                    f"cannot resume {self.out}: checkpoint.enabled = false, so there is no "
                    "checkpoint to continue from, and starting again would discard its "
                    "metrics.jsonl; pass --overwrite to start again, or choose another --out"
                )
            self._note(f"note: checkpoints are disabled; starting {self.out} from scratch")
            return 0, EpochSums()
        found, damaged = ckpt.newest_readable(self.state._asdict(), max_step)
        if found is None and damaged:
            raise CheckpointError(self._unreadable_message(damaged))
        if found is None:
            self._note(f"note: no checkpoint in {folder}; starting from scratch")
            return 0, EpochSums()
        step, state, meta = found
        saved_cfg = config_from_dict(meta["config"])
        changed = [
            k
            for k in config_diff(saved_cfg, self.cfg)
            if k not in _RESUMABLE_CHANGES and not k.startswith(("checkpoint.", "log."))
        ]
        if changed:
            saved, now = flat_config(saved_cfg), flat_config(self.cfg)
            details = ", ".join(f"{k} ({saved[k]!r} -> {now[k]!r})" for k in changed)
            raise ConfigError(
                f"cannot resume {self.out}: the configuration differs from the checkpointed run in "
                f"{details}; resume with the run's own configuration ({self.out / 'config.toml'}) "
                "or start a new --out"
            )
        for d in damaged:  # newer than `step`; kept beside the steps, out of the way
            moved = ckpt.set_aside(d)
            self._note(
                f"warning: the checkpoint at step {d.step} is unreadable ({d.reason}); "
                f"moved it to {moved} and fell back to the older checkpoint at step {step}"
            )
        self.state = TrainState(**state)
        self.resumed_from = step
        self._note(
            f"resumed from checkpoint at step {step} (epoch {step // self.steps_per_epoch + 1})"
        )
        return step, EpochSums.from_checkpoint(meta["sums"])

    def _unreadable_message(self, damaged: list[DamagedCheckpoint]) -> str:
        steps = ", ".join(str(d.step) for d in damaged)
        details = "; ".join(f"step {d.step} ({d.path}): {d.reason}" for d in damaged)
        return (
            f"cannot resume {self.out}: no checkpoint can be read (damaged: step {steps}). "
            f"{details}. Nothing in {self.out} was changed. Put back an intact copy of a "
            "checkpoint folder, or start the run again with --overwrite (replaces its "
            "metrics and checkpoints) or with another --out"
        )

    # ------------------------------------------------------------------ loop

    def run(self, *, stop_at_step: int | None = None) -> dict[str, Any]:
        """Trains to the end (or to ``stop_at_step``) and returns the summary record; the run
        folder's lock is released when it returns or raises (:meth:`close`).

        ``stop_at_step`` ends the run after that global step *without* saving,
        as if the process were killed there (for tests of resumption).

        Raises:
            NonFiniteLossError: a non-finite loss under ``nan_policy = "stop"``;
                a checkpoint of the last good state is kept first.
            KeyboardInterrupt: re-raised after naming the newest checkpoint
                (resume from it with ``resume=True``).
        """
        try:
            return self._run(stop_at_step)
        finally:
            self.close()

    def _run(self, stop_at_step: int | None) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpointer()
        try:
            step, sums = self._restore(ckpt)
        except BaseException:
            if ckpt is not None:
                ckpt.close()
            raise
        start_step = step
        metrics = self._begin(step)
        run_start = time.perf_counter()
        self._note(self._start_line())
        status = "completed"
        try:
            while step < self.total_steps:
                epoch = step // self.steps_per_epoch
                epoch_end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
                t0 = time.perf_counter()
                result = self._train_epoch(
                    epoch, step, epoch_end, sums, ckpt, stop_at_step, writer=metrics
                )
                step, sums, times, failed = (
                    result.step,
                    result.sums,
                    result.step_times,
                    result.failed,
                )
                if failed is not None:
                    raise self._stop_nonfinite(failed, sums, ckpt, metrics)
                if step < epoch_end:  # stop_at_step reached inside the epoch
                    status = "stopped"
                    break
                self._end_epoch(epoch, step, sums, times, t0, ckpt, metrics)
                sums = EpochSums()
                if stop_at_step is not None and step >= stop_at_step:
                    status = "stopped" if step < self.total_steps else status
                    break
            final = self.final_test() if status == "completed" else None
            summary = self._summary(
                status, step, start_step, time.perf_counter() - run_start, final
            )
            if status == "completed" and jax.process_index() == 0:
                metrics.write(summary)
                self._log(self.summary_table())
        except KeyboardInterrupt:
            last = ckpt.steps()[-1] if ckpt is not None and ckpt.steps() else None
            self._note(
                "interrupted; "
                + (
                    f"the newest checkpoint is at step {last} (continue with --resume)"
                    if last is not None
                    else "no checkpoint was saved yet"
                )
            )
            raise
        finally:
            metrics.close()
            if ckpt is not None:
                ckpt.close()
        return summary

    def _begin(self, step: int) -> MetricsWriter:
        """Opens the run's files at ``step``: config.toml, metrics.jsonl (cut back to ``step``
        when resuming, with a resume record), the ignored-options note."""
        cfg = self.cfg
        if self.is_main:
            (self.out / "config.toml").write_text(to_toml(cfg))
        metrics = MetricsWriter(
            self.out / "metrics.jsonl",
            resume_step=step if self.resume else None,
            tensorboard=cfg.log.tensorboard,
            enabled=self.is_main,
        )
        if self.resumed_from is not None and jax.process_index() == 0:
            metrics.write(
                {
                    "kind": "resume",
                    "step": step,
                    "epoch": step // self.steps_per_epoch + 1,
                    "checkpoint": str(self.out / "checkpoints" / str(step)),
                }
            )
        note = ignored_options_note(cfg)
        if note is not None:
            self._note(note)
        return metrics

    def _start_line(self) -> str:
        cfg = self.cfg
        return (
            f"gcgd-train: {cfg.model.name} on {cfg.data.name} (train {len(self.train_ds.labels)}, "
            f"{self.eval_prefix} {len(self.eval_ds.labels)}), {self.num_params:,} parameters; "
            f"{self.total_steps} steps = {self.num_epochs} epoch(s) x {self.steps_per_epoch}, "
            f"batch {cfg.data.batch_size} on {len(self.devices)} {self.devices[0].platform} "
            f"device(s); out {self.out}"
        )

    def _evaluates_after(self, epoch: int, step: int) -> bool:
        """Whether the run evaluates at the end of ``epoch`` (0-based), reached at ``step``."""
        return (epoch + 1) % self.cfg.train.eval_every_epochs == 0 or step >= self.total_steps

    def _end_epoch(self, epoch, step, sums, times, t0, ckpt, metrics, evaluation=None) -> None:
        """Evaluation, the epoch record, the epoch-end checkpoint (in that order).

        ``evaluation``: ``(results, seconds)`` computed by the caller (seed-parallel runs
        evaluate every replica at once); None evaluates here when the epoch is due.
        """
        cfg = self.cfg
        record = self._epoch_record(epoch, step, sums, times, time.perf_counter() - t0)
        last = step >= self.total_steps
        if self._evaluates_after(epoch, step):
            if evaluation is None:
                t1 = time.perf_counter()
                evaluation = (self.evaluate(), time.perf_counter() - t1)
            record.update(evaluation[0])
            record["eval_time"] = evaluation[1]
        record["epoch_time"] = time.perf_counter() - t0
        # The record is written before the checkpoint: a run killed in between resumes from
        # the previous checkpoint, and the record is cut off and written again.
        if jax.process_index() == 0:
            metrics.write(record)
        self._note(self._epoch_line(record))
        every_e, every_s = cfg.checkpoint.every_epochs, cfg.checkpoint.every_steps
        if last or (every_e and (epoch + 1) % every_e == 0) or (every_s and step % every_s == 0):
            self._save(ckpt, step, EpochSums())

    def _train_epoch(
        self, epoch, step, epoch_end, sums, ckpt, stop_at_step, writer=None, on_step=None
    ) -> EpochResult:
        """Steps ``step .. epoch_end-1`` (checkpoints through ``ckpt`` when given)."""
        cfg = self.cfg
        spe = self.steps_per_epoch
        start_batch = step - epoch * spe
        batches = self.batches(epoch, start_batch)
        bar = ProgressBar(
            epoch_end - epoch * spe,
            cfg.data.batch_size,
            f"epoch {epoch + 1}/{self.num_epochs}",
            enabled=cfg.log.progress and jax.process_index() == 0,
            stream=self.stream,
        )
        account = EpochAccount(self, epoch, start_batch, sums, bar, writer, on_step)

        def dispatch():
            images, labels = next(batches)
            first = not self._train_compiled
            if first:
                self._note("compiling the train step (XLA; this takes a while the first time) ...")
                t_compile = time.perf_counter()
            self.state, step_metrics = self._train_step(
                self.state,
                self.parallel.put_local(images),
                self.parallel.put_local(labels),
                self.fusion_breaker,
            )
            if first:
                jax.block_until_ready(step_metrics)
                self._train_compiled = True
                self._note(
                    f"train step compiled; first step done in {time.perf_counter() - t_compile:.1f} s"
                )
                account.restart_clock()  # speeds exclude the compilation
            return step_metrics

        def save(at: int) -> None:
            if account.failed is None:
                self._save(ckpt, at, sums)

        step = run_steps(
            step,
            epoch_end,
            dispatch=dispatch,
            complete=lambda metrics, done: account.complete(host_metrics(metrics), done),
            failed=lambda: account.failed is not None,
            save=save,
            every=cfg.checkpoint.every_steps,
            stop_at_step=stop_at_step,
        )
        bar.close()
        return EpochResult(step, sums, account.times, account.failed)

    def _stop_nonfinite(self, failed, sums, ckpt, metrics) -> NonFiniteLossError:
        """Keeps the last good state (checkpoint) and writes the non-finite summary record;
        returns the error to raise."""
        bad_step, loss = failed
        sums.skipped = 0
        # The step guard left the state at the last good one; only its counters moved on.
        good = self.state._replace(
            step=jnp.asarray(bad_step, jnp.int32),
            nonfinite=jnp.zeros((), jnp.int32),
            halted=jnp.zeros((), jnp.bool_),
        )
        good = jax.device_put(good, self.replicated)
        self._save(ckpt, bad_step, sums, good)
        epoch, batch = divmod(bad_step, self.steps_per_epoch)
        kept = (
            f"a checkpoint of the last good state (step {bad_step}) is in {self.out / 'checkpoints'}"
            if ckpt is not None
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
        if jax.process_index() == 0:
            metrics.write(record)
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
        for key in self._state_metric_keys:  # last step's value (e.g. gc_w_predictor_loss)
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

    def final_test(self) -> dict[str, float] | None:
        """``train.final_test``: loss and accuracy on the test split with the current state,
        as ``final_test_loss`` / ``final_test_acc`` (logged); ``None`` when not asked for."""
        if self.test_ds is None:
            return None
        t0 = time.perf_counter()
        result = self.evaluate(self.test_ds, "test")
        self._note(self._final_test_line(result, time.perf_counter() - t0))
        return {f"final_{k}": v for k, v in result.items()}

    def _final_test_line(self, result: dict[str, float], seconds: float) -> str:
        return (
            f"final test ({len(self.test_ds.labels)} examples, {seconds:.1f} s): "
            f"loss {result['test_loss']:.4f}, acc {100 * result['test_acc']:.2f}%"
        )

    def _summary(
        self,
        status: str,
        step: int,
        start_step: int,
        wall: float,
        final_test: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        records = [r for r in read_metrics(self.out / "metrics.jsonl") if r.get("kind") == "epoch"]
        key = f"{self.eval_prefix}_acc"
        evaluated = [r for r in records if r.get(key) is not None]
        best = max(evaluated, key=lambda r: r[key]) if evaluated else None
        speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
        return {
            "kind": "summary",
            "status": status,
            "name": self.cfg.run.name,
            "step": step,
            "resumed_from_step": self.resumed_from,
            "steps_run": step - start_step,
            "epochs": len(records),
            f"final_{self.eval_prefix}_loss": evaluated[-1][f"{self.eval_prefix}_loss"]
            if evaluated
            else None,
            f"final_{key}": evaluated[-1][key] if evaluated else None,
            f"best_{key}": best[key] if best else None,
            "best_epoch": best["epoch"] if best else None,
            **(final_test or {}),
            "nonfinite_steps": int(host_value(self.state.nonfinite)),
            "images_per_s_median": statistics.median(speeds) if speeds else None,
            "wall_time": wall,
            "devices": len(self.devices),
            "platform": self.devices[0].platform,
        }

    def summary_table(self) -> str:
        """The epoch table of the run so far."""
        records = [r for r in read_metrics(self.out / "metrics.jsonl") if r.get("kind") == "epoch"]
        return summary_table(records, self.eval_prefix)


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """``Trainer(cfg, **kwargs).run()``: trains and returns the summary record."""
    return Trainer(cfg, **kwargs).run()
