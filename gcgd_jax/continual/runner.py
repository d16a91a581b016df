"""The continual-learning run: tasks in order, an evaluation on every task after each.

A run folder (``run.out_dir``, the CLI's ``--out``) holds, like a ``gcgd-train`` run::

    <out>/config.toml      the resolved configuration (re-usable with --config)
    <out>/metrics.jsonl    one JSON record per line (below)
    <out>/checkpoints/     Orbax checkpoints, one after every task (the newest kept)

``metrics.jsonl``: a ``baseline`` record (``accuracies``: every task's test accuracy at
the random initialisation, GEM's :math:`b`), one ``task`` record per task (``task``,
``step``, ``accuracies``: the row :math:`R_{t,\\cdot}` of the accuracy matrix,
``acc_seen``: its mean over the tasks seen so far, ``train_loss``, ``train_time``,
``step_time``, ``eval_time``), a ``resume`` record where a run was resumed, and a last
``summary`` record: ``acc``, ``bwt``, ``fwt`` and the rest of
:func:`~gcgd_jax.continual.metrics.continual_metrics`, the full ``matrix`` and
``baseline``, the compile time and the median time of a train step.

A checkpoint holds the parameters and the optimizer state after a task; its metadata
holds the accuracy rows so far, the baseline and the times. Everything else is a
function of the configuration (the tasks, their order, the memories), so ``resume``
continues with the next task exactly as if the run had not stopped (same compiled
program, same numbers, bit for bit on one machine). One writer per folder
(:class:`~gcgd_jax.train.lock.RunLock`); the checkpoints, the lock and the metrics
file are the training system's own (:mod:`gcgd_jax.train.checkpoint`,
:mod:`gcgd_jax.train.lock`, :mod:`gcgd_jax.train.report`).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gcgd_jax.continual.config import (
    ContinualConfig,
    config_from_dict,
    config_to_dict,
    to_toml,
    validate,
)
from gcgd_jax.continual.memory import EpisodicMemory
from gcgd_jax.continual.metrics import continual_metrics
from gcgd_jax.continual.step import build_correction, build_model, make_functions
from gcgd_jax.continual.tasks import TaskSequence, load_tasks
from gcgd_jax.train.checkpoint import Checkpointer
from gcgd_jax.train.config import ConfigError
from gcgd_jax.train.lock import RunLock
from gcgd_jax.train.report import MetricsWriter, read_metrics

__all__ = ["ContinualRunner", "run_continual"]

# Settings a resumed run may change: where it writes, where the data is, the checkpoints.
_RESUMABLE = ("run.out_dir", "tasks.data_dir", "checkpoint.")


def _flat(cfg: ContinualConfig) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config_to_dict(cfg).items() for k, v in values.items()}


class ContinualRunner:
    """One continual-learning run in one folder.

    The folder is locked and checked on construction (before any data is read):
    an earlier run there needs ``resume`` or ``overwrite``.

    Args:
        cfg: a configuration (validated again here).
        out_dir: replaces ``cfg.run.out_dir``.
        resume: continue from the newest readable checkpoint in the folder.
        overwrite: delete an earlier run's metrics and checkpoints in the folder.
        stream: where progress lines go (None: nowhere).
        tasks: the task sequence (default: :func:`~gcgd_jax.continual.tasks.load_tasks`).

    Raises:
        ConfigError: an invalid configuration, a folder that holds a run (without
            ``resume``/``overwrite``) or is a file, a folder in use by another process.
    """

    def __init__(
        self,
        cfg: ContinualConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        stream: TextIO | None = sys.stderr,
        tasks: TaskSequence | None = None,
    ):
        if out_dir is not None:
            cfg = cfg.replace(run={"out_dir": str(out_dir)})
        validate(cfg)
        self.cfg, self.resume, self.stream, self.tasks = cfg, resume, stream, tasks
        self.out = Path(cfg.run.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output folder {self.out} is a file; choose another --out")
        self.lock = RunLock(self.out)
        try:
            metrics, ckpts = self.out / "metrics.jsonl", self.out / "checkpoints"
            if overwrite:
                metrics.unlink(missing_ok=True)
                shutil.rmtree(ckpts, ignore_errors=True)
            elif not resume and (metrics.exists() or ckpts.exists()):
                raise ConfigError(
                    f"output folder {self.out} already holds a run; pass --resume to continue "
                    "it, --overwrite to replace it, or choose another --out"
                )
        except BaseException:
            self.lock.release()
            raise
        self.params: Any = None
        self.opt_state: Any = None
        self.summary: dict[str, Any] | None = None

    def _note(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Releases the folder's lock."""
        self.lock.release()

    def run(self, *, stop_after_task: int | None = None) -> dict[str, Any] | None:
        """Trains every remaining task and returns the summary record; the folder's lock
        is released when it returns or raises.

        ``stop_after_task`` ends the run after that task's checkpoint is written, as if
        the process were killed there (for tests of resumption); it returns None then.
        """
        try:
            return self._run(stop_after_task)
        finally:
            self.close()

    # ------------------------------------------------------------------ the loop

    def _run(self, stop_after_task: int | None) -> dict[str, Any] | None:
        cfg = self.cfg
        tasks = self.tasks if self.tasks is not None else load_tasks(cfg)
        num_tasks, samples = cfg.tasks.num_tasks, cfg.tasks.samples_per_task
        if tasks.num_tasks != num_tasks:
            raise ConfigError(
                f"tasks.num_tasks = {num_tasks} but the task sequence has {tasks.num_tasks} tasks"
            )
        steps_per_task = samples // cfg.train.batch_size
        model = build_model(cfg, tasks.input_size, tasks.num_classes)
        graphdef, params = nnx.split(model, nnx.Param)
        tx = build_correction(cfg, params)
        opt_state = tx.init(params)
        use_memory = cfg.method.name != "sgd"
        fns = make_functions(
            graphdef, tx, use_memory=use_memory, eval_batch_size=cfg.train.eval_batch_size
        )
        memory = EpisodicMemory(num_tasks, cfg.train.memory_size, tasks.input_size)
        test_images = jnp.asarray(tasks.test_images)
        test_labels = jnp.asarray(tasks.test_labels)
        maps = jnp.asarray(tasks.pixel_maps)
        num_test = int(tasks.test_labels.shape[0])

        def evaluate(p) -> list[float]:
            correct = np.asarray(fns.evaluate(p, test_images, test_labels, maps))
            return [int(c) / num_test for c in correct]

        ckpt = (
            Checkpointer(self.out / "checkpoints", keep=cfg.checkpoint.keep)
            if cfg.checkpoint.enabled
            else None
        )
        try:
            done, params, opt_state, meta = self._restore(ckpt, params, opt_state)
            for t in range(done):  # the memories are a function of the configuration
                memory.store(t, *tasks.memory_inputs(t))
            (self.out / "config.toml").write_text(to_toml(cfg))
            writer = MetricsWriter(
                self.out / "metrics.jsonl", resume_step=meta["step"] if self.resume else None
            )
        except BaseException:
            if ckpt is not None:
                ckpt.close()
            raise
        try:
            if meta.get("resumed"):
                writer.write({"kind": "resume", "step": meta["step"], "task": done})
            self._note(
                f"{cfg.tasks.benchmark}: {num_tasks} tasks x {samples} examples, "
                f"{cfg.method.name}, {cfg.train.memory_size} memories a task, seed "
                f"{cfg.run.seed}; data: {tasks.source or 'given'}; writing {self.out}"
            )
            if done == 0:
                t0 = time.perf_counter()
                meta["baseline"] = evaluate(params)
                writer.write(
                    {
                        "kind": "baseline",
                        "step": 0,
                        "accuracies": meta["baseline"],
                        "eval_time": time.perf_counter() - t0,
                    }
                )
            xs_shape = (steps_per_task, cfg.train.batch_size, tasks.input_size)
            mem_x, mem_y = jnp.asarray(memory.x), jnp.asarray(memory.y)
            t0 = time.perf_counter()
            train_task = fns.train_task.lower(
                params,
                opt_state,
                jax.ShapeDtypeStruct(xs_shape, jnp.float32),
                jax.ShapeDtypeStruct(xs_shape[:2], jnp.int32),
                mem_x,
                mem_y,
                jax.ShapeDtypeStruct((num_tasks,), jnp.bool_),
            ).compile()
            meta.setdefault("compile_time", []).append(time.perf_counter() - t0)
            for t in range(done, num_tasks):
                x, y = tasks.train_inputs(t)
                xs = x.reshape(xs_shape)
                ys = y.reshape(xs_shape[:2])
                t0 = time.perf_counter()
                params, opt_state, losses = train_task(
                    params, opt_state, xs, ys, mem_x, mem_y, memory.mask(t)
                )
                losses = np.asarray(losses)
                train_time = time.perf_counter() - t0
                memory.store(t, *tasks.memory_inputs(t))
                mem_x, mem_y = jnp.asarray(memory.x), jnp.asarray(memory.y)
                t0 = time.perf_counter()
                row = evaluate(params)
                eval_time = time.perf_counter() - t0
                step = (t + 1) * steps_per_task
                record = {
                    "kind": "task",
                    "task": t,
                    "step": step,
                    "accuracies": row,
                    "acc_seen": float(np.mean(row[: t + 1])),
                    "train_loss": float(losses.mean()),
                    "train_time": train_time,
                    "step_time": train_time / steps_per_task,
                    "eval_time": eval_time,
                }
                writer.write(record)
                meta["rows"].append(row)
                meta["times"].append([train_time, eval_time])
                meta["step"] = step
                if ckpt is not None:
                    meta_out = {k: v for k, v in meta.items() if k != "resumed"}
                    ckpt.save(step, {"params": params, "opt_state": opt_state}, meta_out)
                self._note(
                    f"task {t + 1}/{num_tasks}: train loss {record['train_loss']:.4f}, "
                    f"accuracy on the tasks seen {record['acc_seen']:.4f}, "
                    f"{train_time:.1f} s ({1000 * record['step_time']:.2f} ms/step)"
                )
                if stop_after_task is not None and t == stop_after_task:
                    self.params, self.opt_state = params, opt_state
                    return None
            self.params, self.opt_state = params, opt_state
            self.summary = self._summary(meta, steps_per_task)
            writer.write(self.summary)
            self._note(
                f"ACC {self.summary['acc']:.4f}  BWT {self.summary['bwt']:+.4f}  "
                f"FWT {self.summary['fwt']:+.4f}; metrics in {self.out / 'metrics.jsonl'}"
            )
            return self.summary
        except KeyboardInterrupt:
            steps = ckpt.steps() if ckpt is not None else []
            where = f"the checkpoint at step {steps[-1]}" if steps else "the start"
            self._note(f"interrupted: --resume continues from {where}")
            raise
        finally:
            writer.close()
            if ckpt is not None:
                ckpt.close()

    def _restore(
        self, ckpt: Checkpointer | None, params: Any, opt_state: Any
    ) -> tuple[int, Any, Any, dict[str, Any]]:
        """``(tasks done, params, opt_state, meta)`` from the newest readable checkpoint
        (``(0, params, opt_state, fresh meta)`` when starting)."""
        meta: dict[str, Any] = {
            "step": 0,
            "rows": [],
            "baseline": None,
            "times": [],
            "config": config_to_dict(self.cfg),
        }
        if not self.resume:
            return 0, params, opt_state, meta
        if ckpt is None:
            if read_metrics(self.out / "metrics.jsonl"):
                raise ConfigError(
                    f"cannot resume {self.out}: checkpoint.enabled = false, so there is no "
                    "checkpoint to continue from; pass --overwrite to start again"
                )
            return 0, params, opt_state, meta
        found, damaged = ckpt.newest_readable({"params": params, "opt_state": opt_state})
        if found is None and damaged:
            details = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
            raise ConfigError(
                f"cannot resume {self.out}: no checkpoint can be read ({details}); start "
                "again with --overwrite or choose another --out"
            )
        if found is None:
            self._note(f"note: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
            return 0, params, opt_state, meta
        step, state, saved = found
        before, now = _flat(config_from_dict(saved["config"])), _flat(self.cfg)
        changed = [k for k in now if before.get(k) != now[k] and not k.startswith(_RESUMABLE)]
        if changed:
            details = ", ".join(f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in changed)
            raise ConfigError(
                f"cannot resume {self.out}: the configuration differs from the checkpointed "
                f"run in {details}; resume with the run's own configuration "
                f"({self.out / 'config.toml'}) or start a new --out"
            )
        for d in damaged:
            moved = ckpt.set_aside(d)
            self._note(f"warning: checkpoint {d.step} is unreadable ({d.reason}); moved to {moved}")
        saved["config"] = config_to_dict(self.cfg)
        saved["resumed"] = True
        done = len(saved["rows"])
        self._note(f"resumed from the checkpoint after task {done} (step {step})")
        return done, state["params"], state["opt_state"], saved

    def _summary(self, meta: dict[str, Any], steps_per_task: int) -> dict[str, Any]:
        cfg = self.cfg
        train_times = [t for t, _ in meta["times"]]
        device = jax.devices()[0]
        return {
            "kind": "summary",
            "status": "completed",
            "step": meta["step"],
            "name": cfg.run.name,
            "benchmark": cfg.tasks.benchmark,
            "method": cfg.method.name,
            "seed": cfg.run.seed,
            "num_tasks": cfg.tasks.num_tasks,
            **continual_metrics(meta["rows"], meta["baseline"]),
            "matrix": meta["rows"],
            "baseline": meta["baseline"],
            "steps_per_task": steps_per_task,
            "train_time": sum(train_times),
            "eval_time": sum(e for _, e in meta["times"]),
            "step_time_median": statistics.median(t / steps_per_task for t in train_times),
            "compile_time": meta.get("compile_time", []),
            "device": f"{device.platform}: {device.device_kind}",
            "jax": jax.__version__,
        }


def run_continual(cfg: ContinualConfig, **kwargs: Any) -> dict[str, Any] | None:
    """``ContinualRunner(cfg, **kwargs).run()``: the summary record of the run."""
    return ContinualRunner(cfg, **kwargs).run()
