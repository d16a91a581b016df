"""On-disk cache of decoded arrays, so the second run does not decode images again.

An entry is one uncompressed ``.npz`` (``images``, ``labels`` and a JSON
``meta`` string) named ``<name>-<split>-<key>.npz``. The key hashes the
source files' absolute paths, sizes and modification times, plus anything
else that changes the result (format version, image size): editing, replacing
or touching a source file makes a new entry. Entries are written to a
temporary file in the cache folder and renamed into place, so a reader never
sees half an entry and concurrent writers do not corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["cache_key", "default_cache_dir", "load_cached", "resolve_cache_dir", "store_cached"]

_VERSION = 1


def default_cache_dir() -> Path:
    """``$GCGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/gcgd_jax``, else ``~/.cache/gcgd_jax``."""
    if os.environ.get("GCGD_CACHE_DIR"):
        return Path(os.environ["GCGD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gcgd_jax"


def resolve_cache_dir(cache_dir) -> Path | None:
    """``None`` -> the default folder; ``False`` -> caching off (returns None)."""
    if cache_dir is False:
        return None
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    stats = []
    for p in sorted({Path(p).resolve() for p in paths}):
        st = p.stat()
        stats.append((str(p), st.st_size, st.st_mtime_ns))
    return stats


def cache_key(name: str, split: str, files: Iterable[Path], **params) -> str:
    """A hex key for ``name``/``split`` from the source files and extra parameters."""
    blob = json.dumps(
        {"v": _VERSION, "name": name, "split": split, "files": _file_stats(files), **params},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _entry(cache_dir: Path, name: str, split: str, key: str) -> Path:
    return cache_dir / f"{name}-{split}-{key}.npz"


def load_cached(cache_dir: Path, name: str, split: str, key: str):
    """``(images, labels, meta)`` of a cache entry, or None when absent or unreadable."""
    path = _entry(cache_dir, name, split, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, meta = z["images"], z["labels"], json.loads(str(z["meta"]))
    except Exception as e:
        warnings.warn(f"ignoring unreadable cache entry {path}: {e}", stacklevel=3)
        return None
    meta["cache_file"] = str(path)
    return images, labels, meta


def store_cached(
    cache_dir: Path, name: str, split: str, key: str, images, labels, meta: dict
) -> Path | None:
    """Writes an entry atomically (temp file + rename); warns and returns None on failure."""
    path = _entry(cache_dir, name, split, key)
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, meta=np.asarray(json.dumps(meta)))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write cache entry {path}: {e}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return None
    return path
