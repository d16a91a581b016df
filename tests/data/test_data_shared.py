"""The real data sets of the shared data folder (skipped where it is missing)."""

import numpy as np
import pytest

from gcgd_jax.data import load_dataset


@pytest.mark.parametrize("split,count", [("train", 6000), ("test", 1000)])
def test_shared_fashion_mnist(shared_data, split, count):
    ds = load_dataset("fashion_mnist", split, data_dir=shared_data)
    assert (len(ds), ds.images.shape[1:], ds.num_classes) == (10 * count, (28, 28, 1), 10)
    np.testing.assert_array_equal(ds.class_counts(), np.full(10, count))
    assert str(shared_data / "fashion-mnist") in ds.source
    mean = {"train": 0.2860, "test": 0.2868}[split]
    assert abs(ds.images.mean() / 255 - mean) < 1e-4


def test_shared_mnist_class_counts(shared_data):
    ds = load_dataset("mnist", "test", data_dir=shared_data)
    np.testing.assert_array_equal(
        ds.class_counts(), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
