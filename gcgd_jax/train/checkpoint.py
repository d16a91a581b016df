"""Orbax checkpoints of a training run: state, position in the data, metric sums.

One checkpoint per saved step under ``<out>/checkpoints/<step>/`` with two
items: ``state`` (the :class:`~gcgd_jax.train.step.TrainState` as a dict:
parameters, BatchNorm statistics, optimizer state with GC-W's, counters and
the augmentation key) and ``meta`` (JSON: epoch, batch within the epoch, the
running sums of the epoch's train metrics, the configuration). Orbax writes a
checkpoint into a temporary folder and renames it when complete, so a run
killed while writing leaves a ``*.orbax-checkpoint-tmp-*`` folder that
:meth:`Checkpointer.latest` never sees; a step folder that exists but cannot
be restored (damaged by hand, a full disk) is skipped with a warning and the
next older one is used.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


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

    def latest(self, like: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """The newest checkpoint that restores, as ``(step, state, meta)``; None if there is none."""
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, like)
            except Exception as err:  # noqa: BLE001 - any damage: fall back to an older one
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} could not be restored "
                    f"({type(err).__name__}: {err}); trying an older one",
                    stacklevel=2,
                )
                continue
            return step, state, meta
        return None

    def close(self) -> None:
        self._manager.close()
