"""Seed-parallel training: N independent replicas of one configuration in one jitted step.

``run.seeds = [0, 1, 2, 3]`` (``gcgd-train --seeds 0,1,2,3``) trains one
replica per seed, each exactly the run that ``run.seed = s`` would be: its own
initialisation (model, GC-W predictor), data order, augmentation keys,
optimizer and GC-W state, GC-ODE gates, metrics and non-finite guard. Their
train states are stacked along a new leading axis and advanced together by
one compiled program:

- ``run.replica_strategy = "vmap"``: ``jax.vmap`` of the train step over the
  replica axis (one batched program; convolutions become grouped ones);
- ``"unroll"``: one copy of the step per replica inside the same program
  (the same kernels as a single run, so the same numbers; compile time grows
  with N);
- ``"auto"``: ``"unroll"`` on the CPU, ``"vmap"`` elsewhere. Which is faster
  is measured, not assumed: the results page *Seed-parallel training: cost per replica-step*.

Each replica writes ``<out>/s<seed>/`` in exactly the format of a single run
(``config.toml`` with its own ``run.seed`` and no ``run.seeds``,
``metrics.jsonl``, ``run.log``, orbax checkpoints), so ``gcgd-train --resume
--out <out>/s1`` continues one replica alone and every tool that reads a run
folder reads a replica's. ``<out>/config.toml`` is the group's configuration:
``gcgd-train --resume --out <out>`` continues the group. The replicas step in
lockstep, so a group resumes from the newest checkpoint step that every
unfinished replica can restore. The summary record has one extra key,
``replicas`` (N): step times and images/s are those of the shared step.

A replica whose loss or gradient is not finite is handled per replica: under
``train.nan_policy = "skip"`` its step is skipped (its state unchanged) and
counted in its own records; under ``"stop"`` the step guard freezes that
replica at its last good state (the others are unaffected: no value crosses
the replica axis), its folder gets the checkpoint of that state and the
``"nonfinite"`` summary record a single run writes, and the others train on
to the end. :meth:`SeedParallelTrainer.run` then raises
:class:`~gcgd_jax.train.trainer.NonFiniteLossError` naming the stopped seeds
(the CLI exits 3). A stopped replica's frozen copy keeps taking part in the
compiled step (its results are ignored). On ``--resume`` a replica whose
folder already ends with a summary record (completed or stopped) is left as
it is.

Data parallelism is that of a single run: the devices of ``run.num_devices``
form the ``("data",)`` mesh, every replica's batch is split along it
(``P(None, "data")``) and the stacked state is replicated. Seed-parallel runs
are single-process (``run.distributed`` is refused).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gcgd_jax.train.config import ConfigError, TrainConfig, to_toml
from gcgd_jax.train.lock import RunLock
from gcgd_jax.train.report import ProgressBar, read_metrics, summary_table
from gcgd_jax.train.step import TrainState, make_eval_step, make_train_step
from gcgd_jax.train.trainer import (
    EpochAccount,
    EpochSums,
    NonFiniteLossError,
    Trainer,
    host_metrics,
    run_steps,
)

__all__ = ["SeedParallelTrainer", "replica_config", "replica_dir"]


def replica_dir(out: str | Path, seed: int) -> Path:
    """The folder of the replica of ``seed`` in a seed-parallel run's ``out``."""
    return Path(out) / f"s{seed}"


def replica_config(cfg: TrainConfig, seed: int, out: str | Path) -> TrainConfig:
    """The single-run configuration of one replica: ``run.seed = seed``, no ``run.seeds``."""
    return cfg.replace(run={"seed": seed, "seeds": (), "out_dir": str(replica_dir(out, seed))})


def _index(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def _stack(trees: list[Any]) -> Any:
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
class _Replica:
    """A replica's host side: its single-run trainer (files, records, checkpoints)."""

    seed: int
    trainer: Trainer
    index: int  # position on the stacked state's replica axis
    ckpt: Any = None
    writer: Any = None
    sums: EpochSums = dataclasses.field(default_factory=EpochSums)
    start_step: int = 0
    stopped: NonFiniteLossError | None = None  # stopped on a non-finite loss


class SeedParallelTrainer:
    """Trains one replica per seed of ``cfg.run.seeds`` into ``<out>/s<seed>/``.

    Args:
        cfg: a validated configuration with a non-empty ``run.seeds``.
        out_dir: the group's folder (default ``cfg.run.out_dir``).
        resume: continue every unfinished replica from its checkpoints.
        overwrite: replace earlier runs in the replicas' folders.
        stream: where progress and notes go (stderr by default); a replica's
            lines start with ``[s<seed>]``.
        datasets: ``(train, eval)`` already built for ``cfg`` (shared by every replica;
            the data split does not depend on the seed); None loads them.

    Raises:
        ConfigError: as :class:`~gcgd_jax.train.trainer.Trainer`, or no seeds.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        stream: TextIO | None = None,
        datasets: tuple[Any, Any] | None = None,
    ):
        if not cfg.run.seeds:
            raise ConfigError("run.seeds: seed-parallel training needs at least one seed")
        self.cfg = cfg
        self.out = Path(out_dir if out_dir is not None else cfg.run.out_dir)
        self.resume = resume
        self.stream = stream if stream is not None else sys.stderr
        if self.out.is_file():
            raise ConfigError(f"output folder {self.out} is a file; choose another --out")
        if (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists():
            raise ConfigError(
                f"output folder {self.out} holds a single run; a seed-parallel run writes "
                f"{self.out}/s<seed>/ and its own config.toml there: choose another --out"
            )
        # The group's folder is locked first (each replica then locks its own s<seed>/), so
        # a second process on the same --out stops before any replica's --overwrite deletes.
        self._lock = RunLock(self.out) if jax.process_index() == 0 else None
        try:
            self._setup_replicas(cfg, resume, overwrite, datasets)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the folders' locks (the group's and each replica's); :meth:`run` does
        this when it ends, and so does the process exiting."""
        for r in getattr(self, "replicas", ()):
            r.trainer.close()
        if self._lock is not None:
            self._lock.release()

    def _setup_replicas(self, cfg, resume, overwrite, datasets) -> None:
        self.finished: dict[int, str] = {}  # seed -> status of a replica that already ended
        if resume:
            for seed in cfg.run.seeds:
                records = read_metrics(replica_dir(self.out, seed) / "metrics.jsonl")
                if records and records[-1].get("kind") == "summary":
                    self.finished[seed] = records[-1].get("status", "completed")
        self.replicas: list[_Replica] = []
        for seed in cfg.run.seeds:
            if seed in self.finished:
                continue
            trainer = Trainer(
                replica_config(cfg, seed, self.out),
                resume=resume,
                overwrite=overwrite,
                stream=_Prefixed(self.stream, f"[s{seed}] "),
                datasets=datasets,
            )
            datasets = trainer.datasets
            self.replicas.append(_Replica(seed, trainer, len(self.replicas)))
        if self.replicas:
            self._build()

    # ------------------------------------------------------------------ setup

    @property
    def lead(self) -> Trainer:
        """The first unfinished replica's trainer (the shared settings are read from it)."""
        return self.replicas[0].trainer

    @property
    def strategy(self) -> str:
        """``"vmap"`` or ``"unroll"``: how the replicas share the step."""
        s = self.cfg.run.replica_strategy
        if s == "auto":
            return "unroll" if self.lead.parallel.platform == "cpu" else "vmap"
        return s

    def _build(self) -> None:
        lead = self.lead
        for r in self.replicas[1:]:
            if r.trainer.graphdef != lead.graphdef:
                raise ConfigError(  # pragma: no cover - the seed enters values only
                    f"run.seeds: the model of seed {r.seed} differs in structure from that of "
                    f"seed {self.replicas[0].seed}; seed-parallel replicas must share one graph"
                )
        n = len(self.replicas)
        mesh = lead.parallel.mesh
        self.replicated = lead.replicated
        self.replica_batch = NamedSharding(mesh, P(None, "data"))
        # The optimizer's update is the same function for every seed: a seed only reaches
        # tx.init (GC-W's predictor weights), whose result is in each replica's state.
        step = make_train_step(lead.graphdef, lead.opt.tx, lead.step_options)
        evaluate = make_eval_step(lead.eval_graphdef, lead.step_options)
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

        repl, rdata, data = self.replicated, self.replica_batch, lead.batch_sharding
        self._train_step = jax.jit(
            train_fn,
            in_shardings=(repl, rdata, rdata, repl),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            eval_fn, in_shardings=(repl, repl, data, data, data, repl), out_shardings=repl
        )
        self.fusion_breaker = lead.fusion_breaker
        self._train_compiled = self._eval_compiled = False
        self.first_step_s: float | None = None  # compile + first step, once it ran

    def dispatch(self, images: np.ndarray, labels: np.ndarray) -> dict[str, jax.Array]:
        """One seed-parallel train step outside the loop (for benchmarks) on batches stacked
        as ``(replicas, batch, ...)`` (host arrays, or device arrays in ``replica_batch``); returns the ``(replicas,)`` metrics as device
        arrays without waiting. The first call stacks the replicas' current states."""
        if not hasattr(self, "state"):
            states = [r.trainer.state for r in self.replicas]
            self.state = jax.device_put(_stack(states), self.replicated)
        x = jax.device_put(images, self.replica_batch)  # no copy when already placed
        y = jax.device_put(labels, self.replica_batch)
        self.state, metrics = self._train_step(self.state, x, y, self.fusion_breaker)
        return metrics

    def _note(self, message: str) -> None:
        """A line on the stream and in every replica's ``run.log``."""
        self.stream.write(message + "\n")
        self.stream.flush()
        for r in self.replicas:
            r.trainer._log(message)

    def _sync(self, r: _Replica) -> None:
        """Puts the replica's slice of the stacked state into its trainer."""
        r.trainer.state = _index(self.state, r.index)

    # ------------------------------------------------------------------ loop

    def run(self, *, stop_at_step: int | None = None) -> dict[int, dict[str, Any]]:
        """Trains every unfinished replica to the end (or to ``stop_at_step``, without
        saving, as if killed there) and returns the summary record of each seed; the
        folders' locks are released when it returns or raises (:meth:`close`).

        Raises:
            NonFiniteLossError: after the others finished, when a replica stopped on a
                non-finite loss under ``nan_policy = "stop"`` (its folder keeps its
                last good state).
            KeyboardInterrupt: re-raised after naming the newest checkpoint.
        """
        try:
            return self._run(stop_at_step)
        finally:
            self.close()

    def _run(self, stop_at_step: int | None) -> dict[int, dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(to_toml(self.cfg))
        summaries: dict[int, dict[str, Any]] = {}
        if self.finished:
            self._note_finished()
        if not self.replicas:
            return self._finished_summaries(summaries)
        for r in self.replicas:
            r.trainer.out.mkdir(parents=True, exist_ok=True)
            r.ckpt = r.trainer._checkpointer()
        try:
            step = self._restore()
            for r in self.replicas:
                r.writer = r.trainer._begin(step)
                r.start_step = step
        except BaseException:
            self._close()
            raise
        lead, n = self.lead, len(self.replicas)
        self.state = jax.device_put(
            _stack([r.trainer.state for r in self.replicas]), self.replicated
        )
        run_start = time.perf_counter()
        for r in self.replicas:
            r.trainer._note(r.trainer._start_line())
        self._note(
            f"seed-parallel: {n} replica(s) (seeds {', '.join(str(r.seed) for r in self.replicas)})"
            f" in one step ({self.strategy})"
        )
        status = "completed"
        try:
            while step < lead.total_steps and self._running():
                epoch = step // lead.steps_per_epoch
                epoch_end = min((epoch + 1) * lead.steps_per_epoch, lead.total_steps)
                t0 = time.perf_counter()
                step, accounts = self._train_epoch(epoch, step, epoch_end, stop_at_step)
                for r, account in accounts.items():
                    if account.failed is not None:
                        self._sync(r)
                        r.stopped = r.trainer._stop_nonfinite(
                            account.failed, r.sums, r.ckpt, r.writer
                        )
                        r.trainer._note(str(r.stopped))
                if step < epoch_end:  # stop_at_step reached inside the epoch
                    status = "stopped"
                    break
                self._end_epoch(epoch, step, accounts, t0)
                if stop_at_step is not None and step >= stop_at_step:
                    status = "stopped" if step < lead.total_steps else status
                    break
            wall = time.perf_counter() - run_start
            finals = self.final_test() if status == "completed" else [None] * n
            for r in self.replicas:
                if r.stopped is not None:
                    continue
                self._sync(r)
                summary = r.trainer._summary(status, step, r.start_step, wall, finals[r.index])
                summary["replicas"] = n
                summaries[r.seed] = summary
                if status == "completed":
                    r.writer.write(summary)
                    r.trainer._log(r.trainer.summary_table())
        except KeyboardInterrupt:
            steps = [r.ckpt.steps() for r in self.replicas if r.ckpt is not None]
            last = min(s[-1] for s in steps) if steps and all(steps) else None
            self._note(
                "interrupted; "
                + (
                    f"every replica has a checkpoint at step {last} (continue with --resume)"
                    if last is not None
                    else "no checkpoint was saved yet"
                )
            )
            raise
        finally:
            self._close()
        stopped = [r for r in self.replicas if r.stopped is not None]
        if stopped:
            seeds = ", ".join(str(r.seed) for r in stopped)
            raise NonFiniteLossError(
                f"seed(s) {seeds} stopped on a non-finite loss (each folder keeps its last good "
                f"state and says where: {stopped[0].stopped}); the other replicas completed"
            )
        return self._finished_summaries(summaries)

    def _running(self) -> bool:
        return any(r.stopped is None for r in self.replicas)

    def _close(self) -> None:
        for r in self.replicas:
            if r.writer is not None:
                r.writer.close()
            if r.ckpt is not None:
                r.ckpt.close()

    def _note_finished(self) -> None:
        done = ", ".join(f"s{seed} ({status})" for seed, status in self.finished.items())
        self.stream.write(f"seed-parallel: already finished, left as they are: {done}\n")

    def _finished_summaries(self, summaries: dict[int, dict[str, Any]]) -> dict[int, dict]:
        for seed in self.finished:
            records = read_metrics(replica_dir(self.out, seed) / "metrics.jsonl")
            summaries[seed] = records[-1]
        return {seed: summaries[seed] for seed in self.cfg.run.seeds if seed in summaries}

    def _restore(self) -> int:
        """Restores every replica at one common step (the replicas step in lockstep)."""
        initial = [r.trainer.state for r in self.replicas]
        max_step = None
        while True:
            steps, sums = [], []
            for r, state in zip(self.replicas, initial):
                r.trainer.state, r.trainer.resumed_from = state, None
                step, s = r.trainer._restore(r.ckpt, max_step)
                steps.append(step)
                sums.append(s)
            if len(set(steps)) == 1:
                break
            max_step = min(steps)
            self._note(
                f"seed-parallel: the replicas' newest checkpoints differ (steps "
                f"{', '.join(map(str, steps))}); resuming all from step {max_step}"
            )
        for r, s in zip(self.replicas, sums):
            r.sums = s
        return steps[0]

    def _train_epoch(self, epoch, step, epoch_end, stop_at_step) -> tuple[int, dict]:
        lead, cfg = self.lead, self.cfg
        spe, bs = lead.steps_per_epoch, cfg.data.batch_size
        start_batch = step - epoch * spe
        live = [r for r in self.replicas if r.stopped is None]
        iters = {r.index: r.trainer.batches(epoch, start_batch) for r in self.replicas}
        bar = ProgressBar(
            epoch_end - epoch * spe,
            bs,
            f"epoch {epoch + 1}/{lead.num_epochs} (s{live[0].seed} of {len(self.replicas)})",
            enabled=cfg.log.progress,
            stream=self.stream,
        )
        off = ProgressBar(0, bs, "", enabled=False)
        accounts = {
            r: EpochAccount(
                r.trainer, epoch, start_batch, r.sums, bar if r is live[0] else off, r.writer
            )
            for r in live
        }

        def complete(metrics, done_step):
            host = host_metrics(metrics)
            for r, account in accounts.items():
                account.complete({k: v[r.index] for k, v in host.items()}, done_step)

        def failed_all() -> bool:
            return all(a.failed is not None for a in accounts.values())

        def dispatch():
            batch = [next(iters[r.index]) for r in self.replicas]
            images = jax.device_put(np.stack([b[0] for b in batch]), self.replica_batch)
            labels = jax.device_put(np.stack([b[1] for b in batch]), self.replica_batch)
            first = not self._train_compiled
            if first:
                self._note(
                    f"compiling the seed-parallel train step ({len(self.replicas)} replicas, "
                    f"{self.strategy}; XLA) ..."
                )
                t_compile = time.perf_counter()
            self.state, step_metrics = self._train_step(
                self.state, images, labels, self.fusion_breaker
            )
            if first:
                jax.block_until_ready(step_metrics)
                self._train_compiled = True
                self.first_step_s = time.perf_counter() - t_compile
                self._note(f"train step compiled; first step done in {self.first_step_s:.1f} s")
                for account in accounts.values():
                    account.restart_clock()
            return step_metrics

        def save(at: int) -> None:
            for r, account in accounts.items():
                if account.failed is None:
                    self._sync(r)
                    r.trainer._save(r.ckpt, at, r.sums)

        step = run_steps(
            step,
            epoch_end,
            dispatch=dispatch,
            complete=complete,
            failed=failed_all,
            save=save,
            every=cfg.checkpoint.every_steps,
            stop_at_step=stop_at_step,
        )
        bar.close()
        return step, accounts

    def _end_epoch(self, epoch, step, accounts, t0) -> None:
        live = [r for r, a in accounts.items() if a.failed is None]
        evaluations: dict[int, tuple[dict[str, float], float]] = {}
        if live and self.lead._evaluates_after(epoch, step):
            t1 = time.perf_counter()
            results = self.evaluate()
            seconds = time.perf_counter() - t1
            evaluations = {r.index: (results[r.index], seconds) for r in live}
        for r in live:
            self._sync(r)
            account = accounts[r]
            r.trainer._end_epoch(
                epoch,
                step,
                r.sums,
                account.times,
                t0,
                r.ckpt,
                r.writer,
                evaluation=evaluations.get(r.index),
            )
            r.sums = EpochSums()

    # ------------------------------------------------------------------ evaluation

    def final_test(self) -> list[dict[str, float] | None]:
        """``train.final_test``: every replica's ``final_test_loss`` / ``final_test_acc`` (in
        stacking order, each logged in its run.log); ``None`` each when not asked for."""
        lead = self.lead
        if lead.test_ds is None:
            return [None] * len(self.replicas)
        t0 = time.perf_counter()
        results = self.evaluate(lead.test_ds, "test")
        seconds = time.perf_counter() - t0
        for r, result in zip(self.replicas, results, strict=True):
            r.trainer._note(r.trainer._final_test_line(result, seconds))
        return [{f"final_{k}": v for k, v in result.items()} for result in results]

    def evaluate(self, ds: Any = None, prefix: str | None = None) -> list[dict[str, float]]:
        """Loss and accuracy of every replica (in stacking order) on the evaluation split
        (or on ``ds``, its keys named ``prefix``)."""
        prefix = self.lead.eval_prefix if prefix is None else prefix
        totals = None
        first = not self._eval_compiled
        t0 = time.perf_counter()
        if first:
            self._note("compiling the evaluation step (XLA) ...")
        for images, labels, weights in self.lead.eval_batches(ds):
            state: TrainState = self.state
            out = self._eval_step(
                state.params, state.rest, images, labels, weights, self.fusion_breaker
            )
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
            if first:
                jax.block_until_ready(out)
                self._eval_compiled, first = True, False
                self._note(f"evaluation step compiled in {time.perf_counter() - t0:.1f} s")
        host = {k: np.asarray(v, np.float64) for k, v in host_metrics(totals).items()}
        return [
            {
                f"{prefix}_loss": float(host["loss_sum"][i] / max(host["count"][i], 1.0)),
                f"{prefix}_acc": float(host["correct"][i] / max(host["count"][i], 1.0)),
            }
            for i in range(len(self.replicas))
        ]

    def summary_table(self) -> str:
        """Every replica's epoch table, one after the other."""
        parts = []
        for seed in self.cfg.run.seeds:
            records = read_metrics(replica_dir(self.out, seed) / "metrics.jsonl")
            epochs = [r for r in records if r.get("kind") == "epoch"]
            parts.append(f"seed {seed} ({replica_dir(self.out, seed)}):")
            parts.append(summary_table(epochs, self.lead.eval_prefix if self.replicas else "test"))
        return "\n".join(parts)
