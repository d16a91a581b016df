"""Run output: the metrics file, optional TensorBoard, the progress bar, the summary table."""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "TENSORBOARD_MISSING",
    "MetricsWriter",
    "ProgressBar",
    "read_metrics",
    "summary_table",
    "tensorboard_available",
]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (an unfinished last line is dropped)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a killed run: everything after it is suspect
    return records


_TB_MODULES = ("tensorboardX", "torch.utils.tensorboard")
TENSORBOARD_MISSING = (
    "--tensorboard (log.tensorboard = true) needs a TensorBoard writer: "
    "pip install 'gcgd-jax[tensorboard]' (tensorboardX), or drop the option"
)


def tensorboard_available() -> bool:
    """Whether a SummaryWriter (tensorboardX, or torch's) can be imported."""
    return _tensorboard_module() is not None


def _tensorboard_module():
    for module in _TB_MODULES:
        try:
            return importlib.import_module(module)
        except ImportError:  # not installed (torch without tensorboard raises it too)
            continue
    return None


def _tensorboard_writer(logdir: Path):
    mod = _tensorboard_module()
    if mod is None:
        raise RuntimeError(TENSORBOARD_MISSING)
    return mod.SummaryWriter(str(logdir))


class MetricsWriter:
    """Appends one JSON record per line to ``<out>/metrics.jsonl`` (and TensorBoard).

    Args:
        path: the JSONL file.
        resume_step: when resuming from a checkpoint at this step, records of
            later steps (written after that checkpoint by the interrupted run)
            are removed first, so the file reads as if the run never stopped.
            None starts a new file.
        tensorboard: also write scalars to ``<out>/tensorboard`` (needs a
            SummaryWriter: tensorboardX, the ``tensorboard`` extra, or torch's).
        enabled: ``False`` writes nothing (the processes other than 0 of a
            multi-process run).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        resume_step: int | None = None,
        tensorboard: bool = False,
        enabled: bool = True,
    ):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if not enabled:  # another process of a multi-process run writes the files
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("kind") != "summary" and r.get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tb = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None and record.get("kind") == "epoch":
            for key, value in record.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and key != "step"
                ):
                    self._tb.add_scalar(key, value, record["step"])
            self._tb.flush()

    def scalars(self, step: int, values: dict[str, float], prefix: str = "step/") -> None:
        """Per-step scalars, to TensorBoard only (``metrics.jsonl`` keeps one record per epoch)."""
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A one-line progress display per epoch on stderr (images/s, loss, ETA).

    On a terminal the line is redrawn in place at most every ``interval``
    seconds; otherwise (a log file) a line is printed about every 10% of the
    epoch. ``enabled=False`` prints nothing.
    """

    def __init__(
        self,
        total: int,
        batch_size: int,
        label: str,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.25,
    ):
        self.total, self.batch_size, self.label = total, batch_size, label
        self.enabled = enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._next_pct = 0.1

    def update(self, done: int, loss: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        frac = done / self.total
        if self.tty:
            if now - self._last_draw < self.interval and done < self.total:
                return
        elif frac + 1e-9 < self._next_pct and done < self.total:
            return
        else:
            self._next_pct = math.floor(frac * 10 + 1) / 10
        self._last_draw = now
        eta = (self.total - done) * self.batch_size / images_per_s if images_per_s > 0 else math.inf
        width = 24
        filled = round(width * frac)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"| {images_per_s:7.1f} img/s | loss {loss:.4f} | ETA {_clock(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, message: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()


def summary_table(records: Sequence[dict[str, Any]], eval_prefix: str = "test") -> str:
    """A plain-text table of the epoch records (one row per epoch)."""
    columns = [
        ("epoch", "epoch", "{:d}"),
        ("step", "step", "{:d}"),
        ("lr", "lr", "{:.4g}"),
        ("train_loss", "train loss", "{:.4f}"),
        ("train_acc", "train acc", "{:.4f}"),
        (f"{eval_prefix}_loss", f"{eval_prefix} loss", "{:.4f}"),
        (f"{eval_prefix}_acc", f"{eval_prefix} acc", "{:.4f}"),
        ("images_per_s", "img/s", "{:.1f}"),
        ("epoch_time", "time s", "{:.1f}"),
    ]
    rows = [[title for _, title, _ in columns]]
    for r in records:
        row = []
        for key, _, fmt in columns:
            value = r.get(key)
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
