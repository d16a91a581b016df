"""Background transfer of host batches to the device, so the input pipeline does not starve the step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import jax

__all__ = ["prefetch_to_device"]

_END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch_to_device(
    iterator: Iterable, size: int = 2, sharding: jax.sharding.Sharding | None = None
) -> Iterator:
    """Yields the items of ``iterator`` after ``jax.device_put``, ``size`` ahead, from a thread.

    Each item (any pytree of arrays, e.g. an ``(images, labels)`` batch) is
    put on the default device, or laid out with ``sharding`` (e.g.
    ``NamedSharding(mesh, P("data"))`` to split the batch axis over a mesh);
    the sharding applies to every leaf. For one process only: with several
    processes, build global arrays with ``jax.make_array_from_process_local_data``.

    Exceptions of the iterator are re-raised in the consumer. Leaving the loop
    early (``break``, or closing the generator) stops the thread.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return _prefetch(iter(iterator), size, sharding)


def _prefetch(iterator: Iterator, size: int, sharding) -> Iterator:
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for item in iterator:
                if not put(jax.device_put(item, sharding)):
                    return
            put(_END)
        except BaseException as e:
            put(_Raised(e))

    thread = threading.Thread(target=worker, name="gcgd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
