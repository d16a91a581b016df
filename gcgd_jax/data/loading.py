"""`load_dataset`: find a data set wherever it is, decode it once, cache the result.

Where a split is looked for, in this order (the first hit wins):

1. An explicit folder: ``data_dir=`` (CLI ``--data-dir``) or ``$GCGD_DATA_DIR``.
   When one is given, only it is searched (local files in it, then a prepared
   tensorflow-datasets directory in it, then a download into it if allowed).
2. A prepared tensorflow-datasets directory: ``$TFDS_DATA_DIR`` or
   ``~/tensorflow_datasets`` (``tfds.data_source``, array_record format; needs
   the ``tensorflow-datasets`` package, not TensorFlow).
3. Local files in the standard formats, in ``$GCGD_SHARED_DATA``,
   ``../shared/data`` relative to the working directory and to the repository
   root, and Debian's ``/usr/share/datasets/fashion-mnist`` (Fashion-MNIST).
4. A tensorflow-datasets download, only with ``download=True``.
5. Fashion-MNIST only, when no folder was given: the sample bundled with the
   package (``gcgd_jax/data/sample``: a stratified 12,000 training / 2,000 test
   image subset of the official release, checked against its ``SHA256SUMS``).
   One line on stderr says so and how to get the full data set.

Local formats, looked for in each folder ``F`` (``A`` = a folder name of the
data set, e.g. ``cifar10``, ``cifar-10``, ``mnist``, ``fashion-mnist``,
``FashionMNIST``):

* MNIST family: IDX ``train-images-idx3-ubyte[.gz]`` and friends in ``F/A``,
  ``F/A/raw`` (torchvision's layout), or ``F`` itself when ``F`` is explicit.
* CIFAR: ``cifar-10-batches-py/`` (python pickles), ``cifar-10-batches-bin/``
  (binary), their official archives ``cifar-10-python.tar.gz`` /
  ``cifar-10-binary.tar.gz`` (``cifar-100-*`` alike), in ``F`` or ``F/A``.
* Image folders: ``F/A[-jpeg|-png|-images]/<split>/<class>/*`` or the same
  folder packed as ``.tar.gz``/``.tgz``/``.tar`` (with or without one top
  folder inside). Class folders named like the official classes get their
  official index, numbered folders their number, others alphabetical order.

Images decoded from image files or tensorflow-datasets are cached as ``.npz``
(see `gcgd_jax.data.cache`); IDX and CIFAR batches are read directly (about as
fast as reading a cache entry).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import cache as _cache
from . import formats, tfds_source
from .dataset import SPECS, Dataset, DatasetSpec, canonical_name, synthetic_dataset
from .formats import DataFormatError

__all__ = [
    "BUNDLED_SAMPLE",
    "DEBIAN_FASHION_MNIST",
    "DatasetNotFoundError",
    "default_search_roots",
    "load_dataset",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: The Fashion-MNIST sample shipped inside the package (12,000 train / 2,000 test
#: images, IDX files): ``load_dataset("fashion_mnist", data_dir=BUNDLED_SAMPLE)`` reads it
#: whatever other copy the machine has.
BUNDLED_SAMPLE = Path(__file__).resolve().parent / "sample"
_told_about_sample = False
SPLITS = ("train", "test")
_SYNTHETIC_SIZES = {"train": 2048, "test": 512}
_IMAGE_DIR_SUFFIXES = ("", "-jpeg", "-png", "-images")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DatasetNotFoundError(FileNotFoundError):
    """No source holds the requested split; the message lists what was tried."""


@dataclasses.dataclass
class _Found:
    description: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    cache_files: list[Path] | None = None  # None: not worth caching (IDX, CIFAR batches)
    cache_params: dict = dataclasses.field(default_factory=dict)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_search_roots() -> list[Path]:
    """Folders searched for local files when no data folder is given (existing or not)."""
    roots = []
    if os.environ.get("GCGD_SHARED_DATA"):
        roots.append(Path(os.environ["GCGD_SHARED_DATA"]).expanduser())
    roots += [Path.cwd() / ".." / "shared" / "data", _repo_root() / ".." / "shared" / "data"]
    unique: dict[Path, None] = {}
    for r in roots:
        unique.setdefault(r.resolve(), None)
    return list(unique)


# ----------------------------------------------------------------------------- local formats


def _first_file(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _find_idx(folders: list[Path], spec: DatasetSpec, split: str) -> _Found | None:
    prefix = "train" if split == "train" else "t10k"

    def names(kind, nd):
        stems = (f"{prefix}-{kind}-idx{nd}-ubyte", f"{prefix}-{kind}.idx{nd}-ubyte")
        return [s + gz for s in stems for gz in ("", ".gz")]

    for folder in folders:
        images = _first_file(folder, names("images", 3))
        if images is None:
            continue
        labels = _first_file(folder, names("labels", 1))
        if labels is None:
            raise DataFormatError(
                f"{images}: found the images but no labels file beside it (looked for "
                f"{', '.join(names('labels', 1))})"
            )
        return _Found(
            f"IDX files {images} and {labels.name}",
            functools.partial(
                formats.load_idx_pair, images, labels, spec.num_classes, spec.image_shape[:2]
            ),
        )
    return None


def _cifar_layouts(spec: DatasetSpec, split: str):
    """``(kind, folder, official archive, members, parse)`` of CIFAR python and binary batches."""
    k = spec.num_classes
    if spec.name == "cifar10":
        py = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        names = ("cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar-10-batches-bin",
                 "cifar-10-binary.tar.gz", "labels", 1)  # fmt: skip
    else:
        py = [split]
        names = ("cifar-100-python", "cifar-100-python.tar.gz", "cifar-100-binary",
                 "cifar-100-binary.tar.gz", "fine_labels", 2)  # fmt: skip
    py_dir, py_tar, bin_dir, bin_tar, label_key, label_bytes = names
    python = functools.partial(formats.parse_cifar_python, label_key=label_key, num_classes=k)
    binary = functools.partial(formats.parse_cifar_binary, label_bytes=label_bytes, num_classes=k)
    return [
        ("python", py_dir, py_tar, py, python),
        ("binary", bin_dir, bin_tar, [f"{m}.bin" for m in py], binary),
    ]


def _parse_all(blobs: dict[str, bytes], parse) -> tuple[np.ndarray, np.ndarray]:
    parts = [parse(data, where) for where, data in blobs.items()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _cifar_from_files(paths: list[Path], parse):
    return _parse_all({str(p): p.read_bytes() for p in paths}, parse)


def _cifar_from_archive(archive: Path, names: list[str], parse):
    blobs = formats.read_members(archive, names)
    return _parse_all({f"{archive}:{n}": blobs[n] for n in names}, parse)


def _find_cifar(folders: list[Path], direct: Path | None, spec, split) -> _Found | None:
    for kind, folder_name, archive_name, members, parse in _cifar_layouts(spec, split):
        for folder in folders:
            batch_dir = folder / folder_name
            if not batch_dir.is_dir() and folder == direct and (folder / members[0]).is_file():
                batch_dir = folder  # the batches directly in an explicit folder
            if batch_dir.is_dir():
                missing = [m for m in members if not (batch_dir / m).is_file()]
                if missing:
                    raise DataFormatError(
                        f"{batch_dir}: incomplete CIFAR {kind} batches, missing {', '.join(missing)}"
                    )
                return _Found(
                    f"CIFAR {kind} batches {', '.join(members)} in {batch_dir}",
                    functools.partial(_cifar_from_files, [batch_dir / m for m in members], parse),
                )
            archive = folder / archive_name
            if archive.is_file():
                names = [f"{folder_name}/{m}" for m in members]
                return _Found(
                    f"CIFAR {kind} batches in archive {archive}",
                    functools.partial(_cifar_from_archive, archive, names, parse),
                )
    return None


def _image_stems(spec: DatasetSpec) -> list[str]:
    return [a + s for a in spec.aliases for s in _IMAGE_DIR_SUFFIXES]


def _find_images(root: Path, direct: bool, spec: DatasetSpec, split: str) -> _Found | None:
    kwargs = {
        "shape": spec.image_shape,
        "num_classes": spec.num_classes,
        "class_names": spec.class_names,
    }
    folders = ([root] if direct else []) + [root / s for s in _image_stems(spec)]
    for folder in folders:
        split_dir = folder / split
        if split_dir.is_dir():
            files = [p for p in split_dir.rglob("*") if p.is_file()]
            return _Found(
                f"image folder {split_dir} (<class>/<image>, decoded with Pillow)",
                functools.partial(formats.read_image_folder, split_dir, **kwargs),
                cache_files=files,
            )
    for stem in _image_stems(spec):
        for suffix in _ARCHIVE_SUFFIXES:
            archive = root / (stem + suffix)
            if archive.is_file():
                return _Found(
                    f"image archive {archive} ([<folder>/]{split}/<class>/<image>, decoded "
                    "with Pillow)",
                    functools.partial(formats.read_image_tar, archive, split, **kwargs),
                    cache_files=[archive],
                )
    return None


def _find_local(root: Path, direct: bool, spec: DatasetSpec, split: str) -> _Found | None:
    """The first local source of ``spec``/``split`` under ``root``, or None."""
    subfolders = [root / a for a in spec.aliases]
    folders = ([root] if direct else []) + subfolders
    if spec.name in ("mnist", "fashion_mnist"):
        found = _find_idx(folders + [f / "raw" for f in folders], spec, split)
    elif spec.name in ("cifar10", "cifar100"):
        found = _find_cifar([root, *subfolders], root if direct else None, spec, split)
    else:
        return None
    return found or _find_images(root, direct, spec, split)


def _local_formats_text(spec: DatasetSpec, split: str) -> str:
    if spec.name == "imagenet":
        return "ImageNet is read from tensorflow-datasets only"
    alias = "{" + ",".join(spec.aliases) + "}"
    image_dirs = (
        f"image folders {alias}[-jpeg|-png|-images]/{split}/<class>/* or such a folder as "
        ".tar.gz/.tgz/.tar"
    )
    if spec.name in ("mnist", "fashion_mnist"):
        p = "train" if split == "train" else "t10k"
        return (
            f"IDX files {p}-images-idx3-ubyte[.gz] + {p}-labels-idx1-ubyte[.gz] in {alias}/ or "
            f"{alias}/raw/; {image_dirs}"
        )
    layouts = _cifar_layouts(spec, split)
    cifar = "; ".join(f"CIFAR {kind} batches {d}/ or {a}" for kind, d, a, _, _ in layouts)
    return f"{cifar} (in the folder or in {alias}/); {image_dirs}"


# ----------------------------------------------------------------------------- tfds


def _tfds_split(spec: DatasetSpec, split: str) -> str:
    return "validation" if spec.name == "imagenet" and split == "test" else split


def _find_tfds(data_dir: Path, spec, split, *, download, image_size, tried) -> _Found | None:
    what = f"tensorflow-datasets '{spec.tfds_name}' in {data_dir}"
    if download:
        what = f"download of tensorflow-datasets '{spec.tfds_name}' into {data_dir}"
    try:
        source = tfds_source.open_source(
            spec.tfds_name, _tfds_split(spec, split), data_dir, download=download
        )
    except tfds_source.TfdsUnavailable as e:
        tried.append(f"{what}: {e}")
        return None
    resize = image_size if spec.name == "imagenet" else None
    return _Found(
        f"tensorflow-datasets {source.dataset_info.full_name} split "
        f"'{_tfds_split(spec, split)}' in {data_dir}"
        + (f" (shorter side resized to {resize}, centre crop)" if resize else ""),
        lambda: tfds_source.read_examples(
            source, spec.image_shape, spec.num_classes, resize_to=resize
        ),
        cache_files=tfds_source.source_files(source),
        cache_params={"tfds": source.dataset_info.full_name, "n": len(source), "size": resize},
    )


# ----------------------------------------------------------------------------- search


def _search(spec: DatasetSpec, split: str, data_dir, download: bool, image_size: int):
    tried: list[str] = []

    def local(root: Path, direct: bool):
        if not spec.aliases:  # ImageNet: tensorflow-datasets only
            return None
        if not root.is_dir():
            tried.append(f"local files in {root}: folder does not exist")
            return None
        found = _find_local(root, direct, spec, split)
        if found is None:
            tried.append(f"local files in {root}: none found")
        return found

    def tfds(root: Path, dl: bool):
        return _find_tfds(root, spec, split, download=dl, image_size=image_size, tried=tried)

    if data_dir is not None:
        root = Path(data_dir).expanduser().resolve()
        readable = root.is_dir() and os.access(root, os.R_OK | os.X_OK)
        if (root.exists() and not readable) or (not root.exists() and not download):
            what = "is not a readable folder" if root.exists() else "does not exist"
            raise DatasetNotFoundError(
                f"data folder {root} {what}: pass --data-dir (or GCGD_DATA_DIR) naming a folder "
                f"that holds {spec.name!r}, or leave it unset to search the default places."
            )
        steps = [lambda: local(root, True), lambda: tfds(root, False)]
        download_dir = root
    else:
        steps = [lambda: tfds(tfds_source.default_tfds_dir(), False)]
        steps += [lambda r=r: local(r, False) for r in default_search_roots()]
        if spec.name == "fashion_mnist":
            steps.append(lambda: local(DEBIAN_FASHION_MNIST, True))
        download_dir = tfds_source.default_tfds_dir()
    if download:
        steps.append(lambda: tfds(download_dir, True))
    if data_dir is None and spec.name == "fashion_mnist":
        steps.append(lambda: _bundled_sample(spec, split, tried))
    for step in steps:
        found = step()
        if found is not None:
            return found
    if not download:
        tried.append("download: not allowed (download=False)")
    raise DatasetNotFoundError(_not_found_message(spec, split, data_dir, tried))


def _bundled_sample(spec: DatasetSpec, split: str, tried: list[str]) -> _Found:
    """The Fashion-MNIST sample shipped in the package, checked against its manifest."""
    global _told_about_sample
    import hashlib
    import sys

    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    fix = (
        "reinstall gcgd-jax (pip install --force-reinstall gcgd-jax), or pass --data-dir / "
        "GCGD_DATA_DIR naming the full Fashion-MNIST"
    )
    manifest = BUNDLED_SAMPLE / "SHA256SUMS"
    if not manifest.is_file():
        raise DataFormatError(f"the bundled Fashion-MNIST sample is missing ({manifest}): {fix}")
    expected = dict(line.split()[::-1] for line in manifest.read_text().splitlines() if line)
    for name in names:
        path = BUNDLED_SAMPLE / name
        if not path.is_file():
            raise DataFormatError(f"the bundled Fashion-MNIST sample is missing {path}: {fix}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected.get(name):
            raise DataFormatError(f"the bundled Fashion-MNIST sample file {path} is corrupt: {fix}")
    if not _told_about_sample:
        _told_about_sample = True
        print(
            f"gcgd_jax: no Fashion-MNIST found in the {len(tried)} places searched, using the "
            "sample bundled with the package (12,000 train / 2,000 test images); for the full "
            "data set pass --data-dir DIR or set GCGD_DATA_DIR (IDX files), or prepare it with "
            "tensorflow-datasets",
            file=sys.stderr,
        )
    return _Found(
        f"bundled Fashion-MNIST sample {BUNDLED_SAMPLE / names[0]} and {names[1]}",
        functools.partial(
            formats.load_idx_pair,
            BUNDLED_SAMPLE / names[0],
            BUNDLED_SAMPLE / names[1],
            spec.num_classes,
            spec.image_shape[:2],
        ),
    )


def _not_found_message(spec: DatasetSpec, split: str, data_dir, tried: list[str]) -> str:
    lines = [f"no data found for {spec.name!r} split {split!r}. Tried, in order:"]
    lines += [f"  {i}. {t}" for i, t in enumerate(tried, 1)]
    lines.append(f"Local files looked for: {_local_formats_text(spec, split)}.")
    where = "" if data_dir is None else " (only that folder is searched when one is given)"
    lines.append(
        "To fix: pass data_dir=... (CLI --data-dir, or set GCGD_DATA_DIR) naming a folder that "
        f"holds one of these{where}; or prepare it with tensorflow-datasets "
        f"(tfds build {spec.tfds_name} --file_format=array_record --data_dir=DIR, then "
        "data_dir=DIR or TFDS_DATA_DIR=DIR); or, on a machine that is online, "
        "load_dataset(..., download=True)."
    )
    return "\n".join(lines)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    download: bool = False,
    image_size: int = 224,
) -> Dataset:
    """Loads one split of a named data set into memory (uint8 NHWC images, int32 labels).

    Args:
      name: ``"cifar10"``, ``"cifar100"`` (fine labels), ``"mnist"``,
        ``"fashion_mnist"`` (or ``"fashion-mnist"``), ``"imagenet"``
        (tensorflow-datasets ``imagenet2012`` only) or ``"synthetic"``
        (`synthetic_dataset` with seed 0: 2048 train / 512 test examples of
        32x32x3 in 10 classes).
      split: ``"train"`` or ``"test"`` (ImageNet: its ``validation`` split).
      data_dir: folder to search instead of the default places (also
        ``$GCGD_DATA_DIR``); see the module docstring for the search order
        and the accepted layouts.
      cache_dir: where decoded images are cached; default ``$GCGD_CACHE_DIR``
        or ``~/.cache/gcgd_jax``; ``False`` turns caching off.
      download: allow tensorflow-datasets to download and prepare the data set
        when no local copy is found (needs a network; never used by tests).
      image_size: ImageNet only: the shorter side is resized to
        ``image_size`` (bicubic) and the central ``image_size`` square kept.
        The whole split is held in memory (about 1.28M x image_size^2 x 3
        bytes for train), so small sizes or big machines.

    Returns:
      A `Dataset`; its ``source`` says which files it came from (and the cache
      entry, if any).

    Raises:
      ValueError: unknown name or split.
      DatasetNotFoundError: nothing found; the message lists every place tried
        and how to fix it.
      DataFormatError: a file was found but is corrupt, truncated or
        incomplete (the message names it). No fallback to other sources then.
    """
    key = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    spec = SPECS[key]
    if key == "synthetic":
        return synthetic_dataset(
            _SYNTHETIC_SIZES[split], spec.image_shape, spec.num_classes, seed=0, split=split
        )
    if key == "imagenet":
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        spec = dataclasses.replace(spec, image_shape=(int(image_size),) * 2 + (3,))
    if data_dir is None and os.environ.get("GCGD_DATA_DIR"):
        data_dir = os.environ["GCGD_DATA_DIR"]
    found = _search(spec, split, data_dir, download, image_size)

    images = labels = None
    source = found.description
    cache_dir = _cache.resolve_cache_dir(cache_dir)
    if found.cache_files is not None and cache_dir is not None:
        ckey = _cache.cache_key(key, split, found.cache_files, **found.cache_params)
        hit = _cache.load_cached(cache_dir, key, split, ckey)
        if hit is not None and hit[0].shape[1:] == spec.image_shape:
            images, labels, meta = hit
            source = f"{meta['source']} (decoded copy from cache {meta['cache_file']})"
    if images is None:
        images, labels = found.load()
        if found.cache_files is not None and cache_dir is not None:
            path = _cache.store_cached(
                cache_dir, key, split, ckey, images, labels, {"source": found.description}
            )
            if path is not None:
                source = f"{found.description} (decoded; cached at {path})"
    return Dataset(
        images=images,
        labels=labels,
        num_classes=spec.num_classes,
        name=key,
        split=split,
        source=source,
    )
