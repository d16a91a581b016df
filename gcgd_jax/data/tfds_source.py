"""Reading prepared tensorflow-datasets directories, without TensorFlow.

``tfds.data_source`` gives random access to a data set prepared in the
``array_record`` file format; reading needs ``tensorflow-datasets`` (the
optional ``data`` extra) but not TensorFlow. Preparing (``download=True`` or
``tfds build ... --file_format=array_record``) may need TensorFlow for some
builders and is never done unless asked for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .formats import DataFormatError

__all__ = ["TfdsUnavailable", "center_crop_resize", "default_tfds_dir", "open_source",
           "read_examples", "source_files"]  # fmt: skip


class TfdsUnavailable(Exception):
    """The tfds source cannot be used; the message says why (for the 'tried' list)."""


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TfdsUnavailable(
            "tensorflow-datasets is not installed (pip install 'gcgd-jax[data]')"
        ) from e
    return tfds


def default_tfds_dir() -> Path:
    """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (tensorflow-datasets' default)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def open_source(tfds_name: str, split: str, data_dir: Path, *, download: bool = False):
    """``tfds.data_source(...)`` of a prepared split; TfdsUnavailable with the reason if not.

    Without ``download``, tfds is not even imported unless ``data_dir/<tfds_name>/``
    exists (quiet and fast when there is nothing to read).
    """
    if not download and not (Path(data_dir) / tfds_name).is_dir():
        raise TfdsUnavailable(f"not prepared there (no folder {tfds_name}/)")
    tfds = _tfds()
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=str(data_dir), download=download)
    except Exception as e:  # tfds raises many types; we report the reason
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not download:
            with contextlib.suppress(Exception):  # keep the first reason
                if not tfds.builder(tfds_name, data_dir=str(data_dir)).is_prepared():
                    reason = "not prepared there"
        raise TfdsUnavailable(reason) from e


def source_files(source) -> list[Path]:
    """The files of the prepared data set (for the cache key)."""
    folder = Path(str(source.dataset_info.data_dir))
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bicubic, Pillow), then takes the central square."""
    from .formats import _pillow

    pil = _pillow()
    im = pil.fromarray(image)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), pil.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def read_examples(
    source, shape: tuple[int, int, int], num_classes: int, *, resize_to: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All ``image``/``label`` pairs of a tfds data source, as uint8/int32 arrays."""
    n = len(source)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty(n, np.int32)
    where = f"tensorflow-datasets {source.dataset_info.full_name} ({source.split})"
    for i in range(n):
        example = source[i]
        image = np.asarray(example["image"], np.uint8)
        if resize_to is not None:
            image = center_crop_resize(image, resize_to)
        if image.shape != shape:
            raise DataFormatError(f"{where}: example {i} has shape {image.shape}, expected {shape}")
        images[i] = image
        labels[i] = int(example["label"])
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{where}: labels outside [0, {num_classes})")
    return images, labels
