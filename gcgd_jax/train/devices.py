"""Data parallelism over a 1-D device mesh: the devices, their shardings, host <-> device.

The train state is replicated (``NamedSharding(mesh, P())``) and every batch is
split along its batch axis (``P("data")``, or ``P(None, "data")`` for batches
stacked over a run's replicas); one ``jax.jit`` step over these
shardings lets XLA insert the gradient all-reduce and compute BatchNorm
statistics over the whole global batch. With several processes
(``jax.distributed``), each process holds its first ``k`` local devices and
feeds only its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DataParallel", "host_value"]


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (works with several processes too)."""
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The mesh ``("data",)`` over the devices of a run and how arrays are placed on it."""

    devices: tuple[jax.Device, ...]
    mesh: jax.sharding.Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding  # (batch, ...)
    replica_batch_sharding: NamedSharding  # (replicas, batch, ...)

    @classmethod
    def create(cls, num_devices: int | None = None) -> DataParallel:
        """The first ``num_devices`` local devices of every process (all when None).

        Raises:
            ValueError: ``num_devices`` is more than this process has.
        """
        local = jax.local_device_count()
        if num_devices is not None and num_devices > local:
            raise ValueError(
                f"run.num_devices = {num_devices} but this process has only {local} local device(s)"
            )
        k = local if num_devices is None else num_devices
        # The first k local devices of every process (process order, as jax.devices() lists them).
        devices = tuple(
            d
            for p in range(jax.process_count())
            for d in [d for d in jax.devices() if d.process_index == p][:k]
        )
        # Auto axes: XLA propagates the shardings (GSPMD). jax >= 0.8 makes Explicit the
        # default, which puts shardings into types and breaks code not written for it (diffrax).
        mesh = jax.make_mesh(
            (len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices
        )
        return cls(
            devices,
            mesh,
            NamedSharding(mesh, P()),
            NamedSharding(mesh, P("data")),
            NamedSharding(mesh, P(None, "data")),
        )

    @property
    def size(self) -> int:
        """Number of devices in the mesh (all processes)."""
        return len(self.devices)

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    def put_global(self, array: np.ndarray) -> jax.Array:
        """A global host batch (the same on every process) as a batch-sharded array."""
        if jax.process_count() == 1:
            return jax.device_put(array, self.batch_sharding)
        per = len(array) // jax.process_count()
        local = array[jax.process_index() * per : (jax.process_index() + 1) * per]
        return jax.make_array_from_process_local_data(self.batch_sharding, local)

    def put_local(self, local: np.ndarray, *, replica_axis: bool = False) -> jax.Array:
        """This process's rows of a global batch as the batch-sharded global array
        (``replica_axis``: the batch axis is the second, after a run's replicas)."""
        sharding = self.replica_batch_sharding if replica_axis else self.batch_sharding
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        axis = 1 if replica_axis else 0
        shape = list(local.shape)
        shape[axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))
