"""Writing a result: one JSON record and its markdown table, side by side, with the
command that made them and when.

Every script writes ``<out>/<stem>.json`` (the record, every number the table shows
and more) and ``<out>/<stem>.md`` (the table) through :func:`write`; :func:`command`
and :func:`utc_now` are the record's ``command`` and ``date``.
"""

from __future__ import annotations

import datetime
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def command(module: str, argv: Sequence[str]) -> str:
    """The command line that reruns a script: ``python -m <module> <argv...>`` (quoted)."""
    return shlex.join(["python", "-m", module, *argv])


def utc_now() -> str:
    """The date and time, ``YYYY-MM-DD HH:MM UTC``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write(out: Path | str, stem: str, record: dict[str, Any], markdown: str) -> Path:
    """Writes ``record`` to ``out/stem.json`` and ``markdown`` to ``out/stem.md`` (one
    trailing newline each; ``out`` is created); returns the markdown file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    md = out / f"{stem}.md"
    md.write_text(markdown.rstrip("\n") + "\n")
    return md
