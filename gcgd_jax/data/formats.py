"""Strict readers for the standard on-disk formats of image-classification data.

* IDX (MNIST family): ``*-ubyte`` files, raw or ``.gz``; `read_idx`, `write_idx`.
* CIFAR-10/100 "python version" batches (pickles) and "binary version" batches,
  as extracted folders or as the official ``.tar.gz`` archives.
* Image folders ``<split>/<class>/<image>`` and ``.tar.gz``/``.tgz``/``.tar``
  archives of one, decoded with Pillow (the optional ``data`` extra).

Every reader checks what it reads (magic numbers, sizes, label ranges, image
shapes) and raises `DataFormatError` naming the file, never returning fewer
examples than the files claim.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataFormatError",
    "decode_image",
    "load_idx_pair",
    "parse_cifar_binary",
    "parse_cifar_python",
    "read_idx",
    "read_image_folder",
    "read_image_tar",
    "write_idx",
]


class DataFormatError(ValueError):
    """A data file is corrupt, truncated, incomplete or not in the expected format."""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in ``.gz``."""
    gz = path.name.endswith(".gz")
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        what = "corrupt or truncated gzip file" if gz else "cannot read file"
        raise DataFormatError(f"{path}: {what} ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- IDX

# Type byte of the IDX magic number -> big-endian dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (raw, or gzip-compressed when the name ends in ``.gz``).

    The header is checked strictly: magic ``0x0000TTNN`` (TT a known type
    code, NN the number of dimensions), the dimensions, and the file length,
    which must equal header + data exactly.

    Returns:
      The array in native byte order; ``uint8`` for the MNIST family
      (magic 2051 = ``0x00000803``: images ``(N, rows, cols)``; 2049 =
      ``0x00000801``: labels ``(N,)``).

    Raises:
      DataFormatError: bad magic, truncated or over-long file, bad gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: not an IDX file: only {len(data)} bytes")
    z0, z1, code, ndim = data[:4]
    if z0 or z1 or code not in _IDX_TYPES or ndim == 0:
        raise DataFormatError(
            f"{path}: not an IDX file: bad magic number 0x{data[:4].hex()} (expected 0x0000TTNN "
            "with TT a type code and NN the number of dimensions, e.g. 0x00000803 for images, "
            "0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(
            f"{path}: truncated IDX header: {len(data)} bytes, need {header} for {ndim} dimensions"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "too long"
        raise DataFormatError(
            f"{path}: {state} IDX file: the header says shape {tuple(dims)} of {dtype.name} "
            f"({expected} bytes with the header) but the file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: unsupported array {array.dtype} {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(_IDX_TYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def load_idx_pair(
    images_path: Path, labels_path: Path, num_classes: int, image_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W, 1)`` uint8 and labels ``(N,)`` int32 from an IDX pair."""
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataFormatError(
            f"{images_path}: expected IDX images (magic 0x00000803: unsigned bytes, 3 "
            f"dimensions), found {images.dtype} with {images.ndim} dimensions"
        )
    if images.shape[1:] != tuple(image_hw):
        raise DataFormatError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected "
            f"{image_hw[0]}x{image_hw[1]}"
        )
    labels = read_idx(labels_path)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataFormatError(
            f"{labels_path}: expected IDX labels (magic 0x00000801: unsigned bytes, 1 "
            f"dimension), found {labels.dtype} with {labels.ndim} dimensions"
        )
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    _check_labels(labels, num_classes, str(labels_path))
    return images[..., None], labels.astype(np.int32)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(
            f"{where}: labels must lie in [0, {num_classes}), found [{labels.min()}, "
            f"{labels.max()}]"
        )


# ----------------------------------------------------------------------------- CIFAR

_CIFAR_PIXELS = 3 * 32 * 32


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and NumPy arrays only: a CIFAR batch holds
    nothing else, and this refuses pickles that would run other code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: CIFAR batches hold only NumPy arrays, "
                "lists and dicts"
            )
        if module.startswith("numpy.core"):  # NumPy 2 moved it (numpy.core warns)
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def parse_cifar_python(
    data: bytes, where: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` and labels from one CIFAR "python version" batch.

    ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
    Only NumPy arrays, lists and dicts are unpickled (a restricted unpickler).
    """
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad file
        raise DataFormatError(
            f"{where}: not a readable CIFAR python batch ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(batch, dict):
        raise DataFormatError(f"{where}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataFormatError(
            f"{where}: CIFAR batch lacks 'data' or {label_key!r} (keys: {sorted(map(str, batch))})"
        )
    pixels = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != _CIFAR_PIXELS:
        raise DataFormatError(
            f"{where}: 'data' must be uint8 of shape (N, {_CIFAR_PIXELS}), found "
            f"{pixels.dtype} {pixels.shape}"
        )
    if (
        labels.ndim != 1
        or len(labels) != len(pixels)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataFormatError(
            f"{where}: {label_key!r} must hold {len(pixels)} integer labels, found "
            f"{labels.dtype} {labels.shape}"
        )
    _check_labels(labels, num_classes, where)
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def parse_cifar_binary(
    data: bytes, where: str, label_bytes: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from one CIFAR "binary version" batch.

    Each record is ``label_bytes`` label bytes then 3072 pixel bytes (R, G, B
    planes of 32x32). CIFAR-10: 1 label byte; CIFAR-100: 2 (coarse, fine), of
    which the fine label (the last byte) is used.
    """
    record = label_bytes + _CIFAR_PIXELS
    if len(data) == 0 or len(data) % record:
        raise DataFormatError(
            f"{where}: size {len(data)} bytes is not a positive multiple of the record size "
            f"{record} (truncated or not a CIFAR binary batch)"
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int32)
    _check_labels(labels, num_classes, where)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_members(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the named members of a tar archive (one pass over it)."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    found[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({e})") from e
    missing = sorted(wanted - set(found))
    if missing:
        raise DataFormatError(f"{archive}: archive lacks {', '.join(missing)}")
    return found


# ----------------------------------------------------------------------------- images

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff",
)  # fmt: skip


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "decoding image files needs Pillow: pip install 'gcgd-jax[data]' (or: pip install "
            "pillow)"
        ) from e
    return Image


def decode_image(data: bytes, where: str, mode: str) -> np.ndarray:
    """Decodes one image file's bytes to ``(H, W, C)`` uint8 (mode ``"L"``: C=1, ``"RGB"``: 3)."""
    image_mod = _pillow()
    try:
        with image_mod.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert(mode))
    except Exception as e:  # Pillow raises many types for bad files
        raise DataFormatError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
    return array[..., None] if array.ndim == 2 else array


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_order(
    names: Sequence[str], num_classes: int, class_names: Sequence[str], where: str
) -> dict[str, int]:
    """Label of each class folder name.

    Folder names equal to the data set's class names (case-insensitive) get
    their official index; names that are all integers use their value;
    otherwise alphabetical order (for CIFAR-10/100 that is the official order).
    """
    if len(names) != num_classes:
        raise DataFormatError(
            f"{where}: found {len(names)} class folders, expected {num_classes}: "
            f"{', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''}"
        )
    official = {n.lower(): i for i, n in enumerate(class_names)}
    if class_names and all(n.lower() in official for n in names):
        return {n: official[n.lower()] for n in names}
    if all(n.isdigit() for n in names):
        order = {n: int(n) for n in names}
        if sorted(order.values()) != list(range(num_classes)):
            raise DataFormatError(
                f"{where}: numbered class folders must be 0..{num_classes - 1}, found "
                f"{sorted(order.values())}"
            )
        return order
    return {n: i for i, n in enumerate(sorted(names))}


def _decode_all(
    items: Sequence[tuple[int, str, Callable[[], bytes]]], mode: str, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``(label, where, read)`` items into preallocated arrays, checking shapes."""
    images = np.empty((len(items), *shape), np.uint8)
    labels = np.empty(len(items), np.int32)
    for i, (label, where, read) in enumerate(items):
        array = decode_image(read(), where, mode)
        if array.shape != shape:
            raise DataFormatError(
                f"{where}: image is {array.shape[1]}x{array.shape[0]} with {array.shape[2]} "
                f"channel(s), expected {shape[1]}x{shape[0]} with {shape[2]}"
            )
        images[i] = array
        labels[i] = label
    return images, labels


def read_image_folder(
    split_dir: Path, *, shape: tuple[int, int, int], num_classes: int, class_names=()
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes ``split_dir/<class>/<image>`` (sorted by class, then file name)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name[0] != ".")
    order = class_order(classes, num_classes, class_names, str(split_dir))
    items = []
    for cls in sorted(classes, key=order.__getitem__):
        files = sorted(f for f in (split_dir / cls).iterdir() if _is_image(f.name))
        if not files:
            raise DataFormatError(f"{split_dir / cls}: class folder has no image files")
        items += [(order[cls], str(f), f.read_bytes) for f in files]
    return _decode_all(items, "L" if shape[2] == 1 else "RGB", shape)


def image_tar_split_files(archive: Path, split: str) -> dict[str, dict[str, bytes]]:
    """``{class: {member name: bytes}}`` for members ``[top/]<split>/<class>/<image>``."""
    classes: dict[str, dict[str, bytes]] = {}
    tops = set()
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not (member.isfile() and len(parts) in (3, 4) and parts[-3] == split):
                    continue
                if not _is_image(parts[-1]) or parts[-2].startswith("."):
                    continue
                tops.add(parts[0] if len(parts) == 4 else "")
                data = tar.extractfile(member).read()
                classes.setdefault(parts[-2], {})[member.name] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{archive}: corrupt or truncated archive ({e})") from e
    if len(tops) > 1:
        raise DataFormatError(
            f"{archive}: ambiguous layout, '{split}/' appears under several folders: {sorted(tops)}"
        )
    return classes


def read_image_tar(
    archive: Path, split: str, *, shape: tuple[int, int, int], num_classes: int, class_names=()
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes the ``[top/]<split>/<class>/<image>`` members of a tar archive."""
    classes = image_tar_split_files(archive, split)
    if not classes:
        raise DataFormatError(f"{archive}: no images under [<folder>/]{split}/<class>/")
    order = class_order(list(classes), num_classes, class_names, f"{archive} ({split}/)")
    items = []
    for cls in sorted(classes, key=order.__getitem__):
        for name, data in sorted(classes[cls].items()):
            items.append((order[cls], f"{archive}:{name}", (lambda d=data: d)))
    return _decode_all(items, "L" if shape[2] == 1 else "RGB", shape)
