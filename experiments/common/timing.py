"""Timing side by side: worker processes that answer measurement requests, asked in
alternating rounds.

A benchmark whose variants need separate processes (XLA reads its flags once per
process; PyTorch lives in another Python) starts one :class:`Worker` per process. A
worker runs :func:`serve`: it reads one JSON request per line from its standard input
and writes one JSON answer per line. The parent walks :func:`rounds` -- every variant
once per round, the starting variant rotated each round, so that a slow spell of a
noisy machine falls on every variant alike -- pools each variant's per-step times over
the rounds and reports :func:`summary` (min / median / max).

Only the standard library: a worker may run in a Python without this package's
dependencies (the PyTorch one).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def serve(answer: Callable[[dict[str, Any]], dict[str, Any]], hello: dict | None = None) -> None:
    """The worker's side: writes ``hello`` as a first line (when given), then answers
    every JSON request line on standard input with ``answer(request)``, one JSON line,
    until standard input closes."""
    if hello is not None:
        _send(sys.stdout, hello)
    for line in sys.stdin:
        _send(sys.stdout, answer(json.loads(line)))


def _send(stream, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


class Worker:
    """A measuring subprocess that runs :func:`serve`.

    Args:
        name: what the worker is, for error messages.
        cmd: its command line.
        cwd: its working directory.
        env: its environment (the parent's when ``None``).
        hello: read the worker's first line (written by ``serve(..., hello=...)``) into
            :attr:`hello`.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        cwd: Path | str,
        env: Mapping[str, str] | None = None,
        hello: bool = False,
    ):
        self.name = name
        self._proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello: dict[str, Any] = self._read() if hello else {}

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(timeout=60)
            raise RuntimeError(f"the {self.name} worker died (exit code {code})")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sends one request, returns the worker's answer."""
        try:
            _send(self._proc.stdin, request)
        except BrokenPipeError:
            pass  # the worker is gone: the read below says so
        return self._read()

    def close(self, timeout: float = 60) -> None:
        """Closes the worker's standard input (it then exits) and waits for it."""
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        self._proc.wait(timeout=timeout)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rounds(variants: Sequence[T], n_rounds: int) -> Iterator[tuple[int, T]]:
    """``(round, variant)`` for ``n_rounds`` rounds; round ``r`` starts at variant
    ``r mod len(variants)`` and visits every variant once."""
    n = len(variants)
    for r in range(n_rounds):
        for i in range(n):
            yield r, variants[(r + i) % n]


def timed(run_one: Callable[[], object], steps: int) -> list[float]:
    """Per-step wall times of ``steps`` calls; ``run_one`` must block until its step is done."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: Sequence[float], batch: int) -> dict[str, float | int]:
    """``n``, ``step_s_min``, ``step_s_median``, ``step_s_max`` and ``images_per_s`` (at
    the median) of pooled per-step times of a ``batch``-image step."""
    if not times:
        raise ValueError("no step times to summarise")
    median = statistics.median(times)
    return {
        "n": len(times),
        "step_s_min": min(times),
        "step_s_median": median,
        "step_s_max": max(times),
        "images_per_s": batch / median,
    }
