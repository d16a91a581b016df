"""Task sequences: Permuted MNIST and Rotated MNIST as GEM builds them.

Every task of both benchmarks is a fixed re-arrangement of MNIST's pixels, so a task is
one *pixel map* ``m`` of length ``D = 784``: pixel ``d`` of a task's image is pixel
``m[d]`` of the original image, where index ``D`` stands for a blank (0) pixel. Images
are kept once, as uint8 rows with that blank column appended, and each task's inputs
are gathered (on the host for training, on the device for the evaluation).

* Permuted MNIST (GEM's ``data/mnist_permutations.py``): one uniformly random
  permutation of the 784 pixels per task, the first task included.
* Rotated MNIST (GEM's ``data/mnist_rotations.py``, with the 0-180 degrees of its
  ``run_experiments.sh``): task ``t`` is rotated counter-clockwise about the image
  centre by an angle drawn uniformly in the ``t``-th of ``num_tasks`` equal parts of
  ``[min_rotation, max_rotation)``, with nearest-neighbour sampling and blank corners,
  as ``PIL.Image.rotate`` does (see :func:`rotation_map`).

Inputs are pixels / 255 (no normalisation), as in GEM. Each task draws its own
``samples_per_task`` training images from the whole training split, in a random
order (GEM's ``Continuum``); every task is tested on the same test images (all of
them by default). Its episodic memory keeps the examples GEM's ring buffer ends
with (:func:`gcgd_jax.continual.memory.ring_buffer_slots`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gcgd_jax.continual.config import BENCHMARKS, ContinualConfig
from gcgd_jax.continual.memory import ring_buffer_slots
from gcgd_jax.train.config import ConfigError

__all__ = [
    "TaskSequence",
    "build_tasks",
    "draw_angles",
    "load_tasks",
    "permutation_maps",
    "rotation_map",
]


def rotation_map(angle: float, height: int = 28, width: int = 28) -> np.ndarray:
    """The pixel map of a counter-clockwise rotation by ``angle`` degrees.

    Exactly ``PIL.Image.rotate(angle)`` with its defaults (nearest neighbour, about the
    image centre, the same size, blank outside), which GEM's data script calls: a
    multiple of 90 degrees is a transpose; any other angle maps the centre of output
    pixel ``(x, y)`` back through the inverse rotation in Pillow's 16.16 fixed-point
    arithmetic (``ImagingTransformAffine``) and takes the input pixel it falls in.
    Returns ``(height * width,)`` int32 indices into a row-major image with one blank
    pixel appended (index ``height * width``).
    """
    angle = float(angle) % 360.0
    grid = np.arange(height * width).reshape(height, width)
    if angle in (0.0, 180.0) or (angle in (90.0, 270.0) and height == width):
        return np.rot90(grid, k=int(angle) // 90).reshape(-1).astype(np.int32)
    theta = -math.radians(angle)
    m = [
        round(math.cos(theta), 15),
        round(math.sin(theta), 15),
        0.0,
        round(-math.sin(theta), 15),
        round(math.cos(theta), 15),
        0.0,
    ]
    cx, cy = width / 2.0, height / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    a0, a1, a3, a4 = fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4])
    a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5)
    a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5)
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    col = (a2 + y * a1 + x * a0) >> 16
    row = (a5 + y * a4 + x * a3) >> 16
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    return np.where(inside, row * width + col, height * width).reshape(-1).astype(np.int32)


def permutation_maps(rng: np.random.Generator, num_tasks: int, size: int = 784) -> np.ndarray:
    """``(num_tasks, size)`` int32: one uniformly random permutation of the pixels per task."""
    return np.stack([rng.permutation(size) for _ in range(num_tasks)]).astype(np.int32)


def draw_angles(
    rng: np.random.Generator, num_tasks: int, low: float = 0.0, high: float = 180.0
) -> np.ndarray:
    """GEM's angles: task ``t`` uniform in ``low + [t, t + 1) (high - low) / num_tasks``."""
    width = (high - low) / num_tasks
    return np.array([low + (t + rng.random()) * width for t in range(num_tasks)])


@dataclasses.dataclass(frozen=True)
class TaskSequence:
    """A benchmark's tasks over one data set, held once in host memory.

    Attributes:
        benchmark: its name (:data:`gcgd_jax.continual.config.BENCHMARKS`).
        pixel_maps: ``(T, D)`` int32, every task's pixel map (index ``D``: blank).
        angles: ``(T,)`` degrees for Rotated MNIST, else None.
        train_ids: ``(T, n)`` the training examples of each task, in presentation order.
        memory_ids: ``(T, M)`` the examples of each task's episodic memory.
        train_images: ``(N, D + 1)`` uint8 training pixels, a blank column appended.
        train_labels: ``(N,)`` int32.
        test_images: ``(N_test, D + 1)`` uint8, the test images every task uses.
        test_labels: ``(N_test,)`` int32.
        num_classes: classes of the data set.
        source: where the images came from.
    """

    benchmark: str
    pixel_maps: np.ndarray
    angles: np.ndarray | None
    train_ids: np.ndarray
    memory_ids: np.ndarray
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str = ""

    @property
    def num_tasks(self) -> int:
        return int(self.pixel_maps.shape[0])

    @property
    def input_size(self) -> int:
        return int(self.pixel_maps.shape[1])

    def inputs(self, task: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of training examples ``ids`` as task ``task`` shows them: ``x`` float32
        ``(len(ids), D)`` in [0, 1], ``y`` int32."""
        rows = self.train_images[ids]
        x = np.take(rows, self.pixel_maps[task], axis=1).astype(np.float32) / np.float32(255.0)
        return x, self.train_labels[ids]

    def train_inputs(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """The task's training examples in presentation order."""
        return self.inputs(task, self.train_ids[task])

    def memory_inputs(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """The task's episodic memory."""
        return self.inputs(task, self.memory_ids[task])


def build_tasks(
    cfg: ContinualConfig,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int = 10,
    source: str = "",
) -> TaskSequence:
    """The task sequence of ``cfg`` from images ``(N, H, W[, 1])`` uint8 and labels.

    Draws, from ``tasks.seed`` (``run.seed`` when None), independent streams for the
    pixel maps (permutations or angles), the training samples and the test subset.

    Raises:
        ConfigError: the data has fewer images than the configuration asks for, or
          images of another size than the benchmark's.
    """
    tasks, train_cfg = cfg.tasks, cfg.train
    seed = cfg.run.seed if tasks.seed is None else tasks.seed
    streams = [np.random.default_rng([seed, k]) for k in range(3)]
    images, labels = train
    test_images, test_labels = test
    if images.shape[1:3] != (28, 28) or test_images.shape[1:3] != (28, 28):
        raise ConfigError(
            f"tasks.benchmark = {tasks.benchmark!r} needs 28x28 images; the data has "
            f"{images.shape[1:]} (train) and {test_images.shape[1:]} (test)"
        )
    n_train, n_test = len(images), len(test_images)
    if tasks.samples_per_task > n_train:
        raise ConfigError(
            f"tasks.samples_per_task = {tasks.samples_per_task} but the data ({source}) has "
            f"only {n_train} training images"
        )
    if tasks.test_samples is not None and tasks.test_samples > n_test:
        raise ConfigError(
            f"tasks.test_samples = {tasks.test_samples} but the data ({source}) has only "
            f"{n_test} test images"
        )
    size = 28 * 28
    angles = None
    if tasks.benchmark == "permuted_mnist":
        maps = permutation_maps(streams[0], tasks.num_tasks, size)
    else:
        angles = (
            np.asarray(tasks.angles, np.float64)
            if tasks.angles
            else draw_angles(streams[0], tasks.num_tasks, tasks.min_rotation, tasks.max_rotation)
        )
        maps = np.stack([rotation_map(float(a)) for a in angles])
    train_ids = np.stack(
        [
            streams[1].choice(n_train, tasks.samples_per_task, replace=False)
            for _ in range(tasks.num_tasks)
        ]
    )
    slots = np.asarray(
        ring_buffer_slots(
            tasks.num_tasks, tasks.samples_per_task, train_cfg.batch_size, train_cfg.memory_size
        )
    )
    memory_ids = np.take_along_axis(train_ids, slots, axis=1)
    test_ids = (
        np.arange(n_test)
        if tasks.test_samples is None
        else np.sort(streams[2].choice(n_test, tasks.test_samples, replace=False))
    )

    def rows(x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, np.uint8).reshape(len(x), size)
        return np.concatenate([flat, np.zeros((len(x), 1), np.uint8)], axis=1)

    return TaskSequence(
        benchmark=tasks.benchmark,
        pixel_maps=maps,
        angles=angles,
        train_ids=train_ids,
        memory_ids=memory_ids,
        train_images=rows(images),
        train_labels=np.asarray(labels, np.int32),
        test_images=rows(test_images[test_ids]),
        test_labels=np.asarray(test_labels, np.int32)[test_ids],
        num_classes=num_classes,
        source=source,
    )


def load_tasks(cfg: ContinualConfig) -> TaskSequence:
    """Reads the benchmark's data set with :func:`gcgd_jax.data.load_dataset` (``tasks.data_dir``,
    else ``$GCGD_DATA_DIR``, else the default places; never downloads) and builds the tasks."""
    from gcgd_jax.data import load_dataset

    bench = BENCHMARKS[cfg.tasks.benchmark]
    train = load_dataset(bench.dataset, "train", data_dir=cfg.tasks.data_dir, download=False)
    test = load_dataset(bench.dataset, "test", data_dir=cfg.tasks.data_dir, download=False)
    return build_tasks(
        cfg,
        (train.images, train.labels),
        (test.images, test.labels),
        num_classes=train.num_classes,
        source=f"{train.source}; {test.source}",
    )
