"""Timing side by side: the alternating rounds every benchmark runs, in its own process
or through worker processes that answer measurement requests.

Every benchmark runs the same protocol, :func:`alternate`: it walks :func:`rounds` --
every variant once per round, the starting variant rotated each round, so that a slow
spell of a noisy machine falls on every variant alike -- asks for one measurement of the
variant (its per-step times, usually :func:`timed`), pools each variant's times over the
rounds, and reports :func:`summary` (min / median / max).

A measurement is made in the benchmark's own process, or in a worker process where the
variants need separate processes (XLA reads its flags once per process; PyTorch lives in
another Python; a variant that patches a library for good): one :class:`Worker` per
process, which runs :func:`serve`: it reads one JSON request per line from its standard
input and writes one JSON answer per line.

Only the standard library: a worker may run in a Python without this package's
dependencies (the PyTorch one).
"""

from __future__ import annotations

import json
import os
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
    until standard input closes.

    The answers go to the process's standard output as it was when ``serve`` started;
    from then on whatever else writes to standard output (a library's print, Python's or
    C's) lands on standard error instead, so it cannot break the protocol."""
    protocol = _protocol_stream()
    if hello is not None:
        _send(protocol, hello)
    for line in sys.stdin:
        _send(protocol, answer(json.loads(line)))


def _protocol_stream():
    """A stream on a copy of standard output's file descriptor; descriptor 1 itself is then
    pointed at standard error."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w")


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


def alternate(
    variants: Sequence[T],
    n_rounds: int,
    measure: Callable[[int, T], Sequence[float]],
    *,
    describe: Callable[[T], str] = str,
    progress: bool = True,
) -> dict[T, list[float]]:
    """The side-by-side protocol: ``measure(round, variant)`` (the per-step times of one
    measurement, in seconds) for every variant once per round, in :func:`rounds`' order,
    pooled per variant (in ``variants``' order). ``measure`` gets the round so it can warm
    up on the first; with ``progress`` a line per measurement (``describe(variant)`` and its
    pooled median) goes to standard error."""
    variants = list(variants)
    times: dict[T, list[float]] = {v: [] for v in variants}
    for r, v in rounds(variants, n_rounds):
        times[v].extend(measure(r, v))
        if progress:
            med = statistics.median(times[v]) if times[v] else float("nan")
            print(
                f"round {r + 1}/{n_rounds} {describe(v)}: median {med:.4g} s "
                f"({len(times[v])} steps)",
                file=sys.stderr,
                flush=True,
            )
    return times


def timed(run_one: Callable[[], object], steps: int) -> list[float]:
    """Per-step wall times of ``steps`` calls; ``run_one`` must block until its step is done."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: Sequence[float], batch: int | None = None) -> dict[str, float | int]:
    """``n``, ``step_s_min``, ``step_s_median``, ``step_s_max`` of pooled per-step times
    and, for a ``batch``-image step, ``images_per_s`` (at the median)."""
    if not times:
        raise ValueError("no step times to summarise")
    median = statistics.median(times)
    out: dict[str, float | int] = {
        "n": len(times),
        "step_s_min": min(times),
        "step_s_median": median,
        "step_s_max": max(times),
    }
    if batch is not None:
        out["images_per_s"] = batch / median
    return out
