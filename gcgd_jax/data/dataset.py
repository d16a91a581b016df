"""In-memory data sets and the host-side pipeline: specs, synthetic data, subsets, batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

__all__ = [
    "SPECS",
    "Dataset",
    "DatasetSpec",
    "batch_iterator",
    "canonical_name",
    "normalization",
    "num_batches",
    "split_validation",
    "synthetic_dataset",
    "take",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image-classification split held in host memory.

    Attributes:
      images: ``(N, H, W, C)`` uint8 pixels, NHWC (C is 1 for the MNIST family).
      labels: ``(N,)`` int32 class indices in ``[0, num_classes)``.
      num_classes: number of classes of the data set (not only those present).
      name: canonical data set name (``"cifar10"``, ``"fashion_mnist"``, ...).
      split: ``"train"``, ``"test"`` or ``"validation"`` (see `split_validation`).
      source: human-readable description of where the data came from.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    split: str
    source: str

    def __post_init__(self):
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"Dataset {self.name!r}: images must be a uint8 array (N, H, W, C), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                f"{getattr(images, 'shape', '')}"
            )
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int32:
            raise ValueError(
                f"Dataset {self.name!r}: labels must be an int32 array (N,), got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                f"{getattr(labels, 'shape', '')}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"Dataset {self.name!r}: {len(images)} images but {len(labels)} labels"
            )
        if self.num_classes < 1:
            raise ValueError(f"Dataset {self.name!r}: num_classes must be >= 1")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Dataset {self.name!r}: labels must lie in [0, {self.num_classes}), got "
                f"[{labels.min()}, {labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])

    def class_counts(self) -> np.ndarray:
        """Examples per class, ``(num_classes,)`` int64."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices, *, split: str | None = None, note: str = "") -> Dataset:
        """The examples at ``indices`` (in that order), as a new `Dataset`."""
        indices = np.asarray(indices, dtype=np.int64)
        return Dataset(
            images=self.images[indices],
            labels=self.labels[indices],
            num_classes=self.num_classes,
            name=self.name,
            split=self.split if split is None else split,
            source=f"{self.source}; {note}" if note else self.source,
        )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What is known about a named data set before loading it."""

    name: str  # canonical name
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C); ImageNet: resized to image_size
    mean: tuple[float, ...]  # per channel, pixels scaled to [0, 1], train split
    std: tuple[float, ...]
    tfds_name: str | None = None
    class_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # folder/file stems searched for local copies


_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

SPECS: dict[str, DatasetSpec] = {
    # Official CIFAR-10 train statistics; the JPEG copy in shared/data measures
    # mean 0.4913, 0.4821, 0.4465 and std 0.2452, 0.2428, 0.2606 (its README).
    "cifar10": DatasetSpec(
        "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        tfds_name="cifar10", class_names=_CIFAR10_CLASSES,
        aliases=("cifar10", "cifar-10", "CIFAR10", "CIFAR-10"),
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        tfds_name="cifar100", aliases=("cifar100", "cifar-100", "CIFAR100", "CIFAR-100"),
    ),
    "mnist": DatasetSpec(
        "mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), tfds_name="mnist",
        class_names=tuple(str(i) for i in range(10)), aliases=("mnist", "MNIST"),
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), tfds_name="fashion_mnist",
        class_names=_FASHION_CLASSES,
        aliases=("fashion-mnist", "fashion_mnist", "FashionMNIST", "fashion"),
    ),
    "imagenet": DatasetSpec(
        "imagenet", 1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
        tfds_name="imagenet2012",
    ),
    # One channel-agnostic value: it broadcasts over any number of channels.
    "synthetic": DatasetSpec("synthetic", 10, (32, 32, 3), (0.5,), (0.25,)),
}  # fmt: skip

_ALIASES = {"fashion-mnist": "fashion_mnist", "imagenet2012": "imagenet"}


def canonical_name(name: str) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; ValueError for unknown names."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(
            f"unknown data set {name!r}; known: {', '.join(sorted(SPECS))} "
            f"(also accepted: {', '.join(sorted(_ALIASES))})"
        )
    return key


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of the train split, for pixels scaled to [0, 1].

    Returns float32 arrays of shape ``(C,)``; for ``"synthetic"`` shape ``(1,)``
    (0.5, 0.25), which broadcasts over any number of channels. Values: the
    README of the shared data for MNIST/Fashion-MNIST, the commonly cited
    train statistics of the official CIFAR-10/100 releases, and the usual
    ImageNet constants.
    """
    spec = SPECS[canonical_name(name)]
    return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)


def synthetic_dataset(
    num_examples: int = 256,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    seed: int = 0,
    *,
    split: str = "train",
) -> Dataset:
    """A small learnable data set for tests: a class pattern plus pixel noise.

    Each class has a fixed, left-right symmetric pattern (values uniform in
    [0.1, 0.9] on a 4x4 grid, upsampled to ``image_shape``; symmetric so that
    horizontal flips keep the class) drawn from ``seed``. Each example is its class pattern plus
    Gaussian noise (std 0.1 on the [0, 1] scale), as uint8. Classes are
    balanced (``label = i % num_classes`` before a shuffle). Deterministic in
    all arguments; ``split`` draws other examples of the same classes.
    """
    if num_examples < 1 or num_classes < 1 or len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(
            "synthetic_dataset: need num_examples >= 1, num_classes >= 1 and image_shape (H, W, C)"
            f" with positive sizes; got {num_examples}, {num_classes}, {image_shape}"
        )
    h, w, c = (int(s) for s in image_shape)
    grid = 4
    proto_rng = np.random.default_rng((seed, 0))
    half = proto_rng.uniform(0.1, 0.9, size=(num_classes, grid, grid // 2, c))
    coarse = np.concatenate([half, half[:, :, ::-1]], axis=2)  # left-right symmetric
    rows = np.arange(h) * grid // h
    cols = np.arange(w) * grid // w
    protos = coarse[:, rows][:, :, cols]  # (K, H, W, C)
    split_id = {"train": 1, "test": 2, "validation": 3}.get(split)
    if split_id is None:
        raise ValueError(
            f"synthetic_dataset: split must be train, test or validation, got {split!r}"
        )
    rng = np.random.default_rng((seed, split_id))
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    noise = rng.normal(0.0, 0.1, size=(num_examples, h, w, c))
    images = np.clip(np.rint((protos[labels] + noise) * 255.0), 0, 255).astype(np.uint8)
    return Dataset(
        images=images,
        labels=labels,
        num_classes=num_classes,
        name="synthetic",
        split=split,
        source=(
            f"synthetic_dataset(num_examples={num_examples}, image_shape={(h, w, c)}, "
            f"num_classes={num_classes}, seed={seed}, split={split!r})"
        ),
    )


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch over ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_iterator(
    ds: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_batch: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images, labels)`` NumPy batches of one epoch.

    The order is ``np.random.default_rng((seed, epoch)).permutation(len(ds))``
    (the identity when ``shuffle=False``), so an epoch is reproducible from
    ``(seed, epoch)`` alone; ``start_batch`` skips the first batches of that
    order without touching them (for resuming mid-epoch). With
    ``drop_remainder`` the last partial batch is dropped, otherwise it is
    yielded short. ``shard=(i, k)`` yields only rows ``i*b/k .. (i+1)*b/k - 1``
    of every batch of ``b`` (what process ``i`` of ``k`` feeds to its devices);
    the batches are the same as without it, cut into ``k`` equal parts.

    Raises:
      ValueError: bad ``batch_size``/``start_batch``/``shard``, or
        ``drop_remainder`` with fewer than ``batch_size`` examples (an epoch
        with no batches).
    """
    index, count = shard
    if not (isinstance(count, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} must be divisible by the shard count {count}")
    part = batch_size // count
    n = len(ds)
    total = num_batches(n, batch_size, drop_remainder)
    if total == 0 and n > 0:
        raise ValueError(
            f"batch_iterator: batch_size {batch_size} > {n} examples of {ds.name}/{ds.split} "
            "with drop_remainder=True gives no batches"
        )
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    for b in range(start_batch, total):
        lo = b * batch_size + (index * part if count > 1 else 0)
        hi = min(lo + (part if count > 1 else batch_size), n)
        idx = order[lo:hi]
        if not shuffle:  # contiguous: slice (a view) instead of gathering a copy
            idx = slice(lo, hi)
        yield ds.images[idx], ds.labels[idx]


def _stratified_counts(class_sizes: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes proportionally to ``class_sizes`` (largest remainder)."""
    total = int(class_sizes.sum())
    if n == 0 or total == 0:
        return np.zeros(len(class_sizes), np.int64)
    exact = class_sizes * (n / total)
    counts = np.floor(exact).astype(np.int64)
    remainder = n - int(counts.sum())
    # Largest fractional part first; ties by class index (stable sort).
    order = np.argsort(-(exact - counts), kind="stable")
    for k in order:
        if remainder == 0:
            break
        if counts[k] < class_sizes[k]:
            counts[k] += 1
            remainder -= 1
    return counts


def _select(ds: Dataset, n: int, seed: int | None, stratified: bool) -> np.ndarray:
    """Sorted indices of ``n`` examples (first ones when ``seed`` is None)."""
    size = len(ds)
    if not 0 <= n <= size:
        raise ValueError(f"cannot take {n} examples from {size} ({ds.name}/{ds.split})")
    rng = None if seed is None else np.random.default_rng(seed)

    def pick(pool: np.ndarray, k: int) -> np.ndarray:
        return pool[:k] if rng is None else rng.choice(pool, size=k, replace=False)

    if not stratified:
        return np.sort(pick(np.arange(size), n))
    counts = _stratified_counts(ds.class_counts(), n)
    parts = [pick(np.flatnonzero(ds.labels == k), int(c)) for k, c in enumerate(counts) if c]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def take(ds: Dataset, n: int, *, seed: int | None = None, stratified: bool = True) -> Dataset:
    """A subset of ``n`` examples, kept in their original order.

    With ``stratified`` each class gets its share of ``n`` in proportion to its
    size (largest-remainder rounding). ``seed=None`` takes the first examples
    (of each class); an integer seed draws them at random.
    """
    idx = _select(ds, n, seed, stratified)
    how = "stratified" if stratified else "plain"
    return ds.subset(idx, note=f"take({n}, seed={seed}, {how})")


def split_validation(ds: Dataset, fraction: float, *, seed: int) -> tuple[Dataset, Dataset]:
    """Carves a stratified validation set from ``ds``: returns ``(train, validation)``.

    ``round(fraction * len(ds))`` examples, drawn per class in proportion to
    the class sizes, go to the validation part (split ``"validation"``); the
    rest stay in the training part (same split name as ``ds``). Both keep the
    original order, are disjoint and together hold every example.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    k = round(fraction * len(ds))
    if not 0 < k < len(ds):
        raise ValueError(f"fraction {fraction} of {len(ds)} examples leaves an empty part")
    val_idx = _select(ds, k, seed, stratified=True)
    mask = np.ones(len(ds), bool)
    mask[val_idx] = False
    note = f"split_validation(fraction={fraction}, seed={seed})"
    train = ds.subset(np.flatnonzero(mask), note=f"{note}: training part")
    val = ds.subset(val_idx, split="validation", note=f"{note}: validation part")
    return train, val
