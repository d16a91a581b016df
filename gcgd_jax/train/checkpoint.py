"""Orbax checkpoints of a training run: state, position in the data, metric sums.

One checkpoint per saved step under ``<out>/checkpoints/<step>/`` with two
items: ``state`` (the :class:`~gcgd_jax.train.step.TrainState` as a dict:
parameters, BatchNorm statistics, optimizer state with GC-W's, counters and
the augmentation key) and ``meta`` (JSON: epoch, batch within the epoch, the
running sums of the epoch's train metrics, the configuration). Orbax writes a
checkpoint into a temporary folder and renames it when complete, so a run
killed while writing leaves a ``*.orbax-checkpoint-tmp-*`` folder that
:meth:`Checkpointer.steps` never lists.

A step folder that exists but cannot be restored (damaged by hand, a full
disk) is reported by :meth:`Checkpointer.newest_readable` as
:class:`DamagedCheckpoint`; the trainer then resumes from the next older
readable one and moves the damaged folder aside (:meth:`Checkpointer.set_aside`,
nothing is deleted), or, when none is readable, stops with an error and
touches nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "DamagedCheckpoint"]

log = logging.getLogger(__name__)

_REASON_CHARS = 300


@dataclasses.dataclass(frozen=True)
class DamagedCheckpoint:
    """A complete-looking step folder whose restore failed."""

    step: int
    path: Path
    reason: str  # the restore error, first line, shortened


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > _REASON_CHARS:
        first = first[:_REASON_CHARS] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class Checkpointer:
    """A thin wrapper of :class:`orbax.checkpoint.CheckpointManager`."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Saves (synchronously); False when a checkpoint of ``step`` already exists."""
        if step in self._manager.all_steps():
            return False
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores ``step`` into the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def newest_readable(
        self, like: dict[str, Any], max_step: int | None = None
    ) -> tuple[tuple[int, dict[str, Any], dict[str, Any]] | None, list[DamagedCheckpoint]]:
        """The newest checkpoint that restores, and the newer ones that did not.

        ``max_step``: only checkpoints of this step or older are considered.

        Returns:
            ``((step, state, meta) or None, damaged)``: ``damaged`` lists the
            unreadable step folders tried before it, newest first (all of
            them when nothing restores). Nothing on disk is changed.
        """
        damaged: list[DamagedCheckpoint] = []
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                state, meta = self.restore(step, like)
            except Exception as err:
                damaged.append(
                    DamagedCheckpoint(step, self.directory / str(step), _short_reason(err))
                )
                continue
            return (step, state, meta), damaged
        return None, damaged

    def latest(self, like: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that restores, as ``(step, state, meta)``; None if there is none.

        Each unreadable newer one is skipped with a warning.
        """
        found, damaged = self.newest_readable(like)
        for d in damaged:
            warnings.warn(
                f"checkpoint {d.path} could not be restored ({d.reason}); trying an older one",
                stacklevel=2,
            )
        return found

    def set_aside(self, damaged: DamagedCheckpoint) -> Path:
        """Renames a damaged step folder to ``<step>.damaged[-N]`` (kept, no longer a step)."""
        target = damaged.path.with_name(f"{damaged.step}.damaged")
        n = 1
        while target.exists():
            n += 1
            target = damaged.path.with_name(f"{damaged.step}.damaged-{n}")
        try:
            damaged.path.rename(target)
        except FileNotFoundError:  # another process of a multi-host run moved it first
            pass
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()
