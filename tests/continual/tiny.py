"""A tiny MNIST-shaped data set on disk and the tiny continual-learning setting of the tests."""

from __future__ import annotations

from pathlib import Path

from gcgd_jax.data import synthetic_dataset, write_idx

# 3 tasks x 50 examples in batches of 10, 10 memories a task, 100 test images, a small MLP.
TINY_SETTINGS = (
    "tasks.num_tasks=3",
    "tasks.samples_per_task=50",
    "train.memory_size=10",
    "train.hidden=[32, 32]",
    "train.eval_batch_size=64",
)


def write_tiny_mnist(folder: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """IDX files of a learnable 28x28 data set (class patterns plus noise) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        ds = synthetic_dataset(n, (28, 28, 1), 10, seed=3, split=split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", ds.images[..., 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", ds.labels.astype("uint8"))
    return folder


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """``gcgd-continual`` arguments of the tiny setting."""
    args = ["--data-dir", str(data_dir), "--out", str(out), "--quiet"]
    for setting in (*TINY_SETTINGS, *extra):
        args += ["--set", setting]
    return args
