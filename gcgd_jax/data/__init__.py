"""Data for the training system: image-classification sets, batches, augmentation.

* `load_dataset` finds a split (explicit folder, prepared tensorflow-datasets,
  local IDX / CIFAR batches / image folders, the shared data, optional
  download), decodes it once and caches the decoded arrays.
* `Dataset` holds uint8 NHWC images and int32 labels in host memory;
  `batch_iterator`, `take` and `split_validation` work on it.
* `augment` has the on-device, jit-able CIFAR augmentation and normalisation.
"""

from . import augment, cache, formats
from .dataset import (
    SPECS,
    Dataset,
    DatasetSpec,
    batch_iterator,
    canonical_name,
    normalization,
    num_batches,
    split_validation,
    synthetic_dataset,
    take,
)
from .formats import DataFormatError, read_idx, write_idx
from .loading import BUNDLED_SAMPLE, DatasetNotFoundError, default_search_roots, load_dataset

#: The canonical names :func:`load_dataset` accepts, sorted.
DATASETS = tuple(sorted(SPECS))

__all__ = [
    "BUNDLED_SAMPLE",
    "DATASETS",
    "SPECS",
    "DataFormatError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "augment",
    "batch_iterator",
    "cache",
    "canonical_name",
    "default_search_roots",
    "formats",
    "load_dataset",
    "normalization",
    "num_batches",
    "read_idx",
    "split_validation",
    "synthetic_dataset",
    "take",
    "write_idx",
]
