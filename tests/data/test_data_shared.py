"""The real data sets of the shared data folder.

Skipped where the folder is missing, except with ``CI=true``, where a missing folder fails
these tests (tests/conftest.py), so CI cannot pass without reading real data.
"""

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


def test_shared_cifar10_jpeg_archive(shared_data, tmp_path):
    """The CIFAR-10 JPEG tarball through the loader (test split: 10,000 JPEGs, about 3 s to
    decode), then again from the decoded-image cache. Statistics from the folder's README."""
    archive = shared_data / "cifar10-jpeg.tar.gz"
    assert archive.is_file()
    ds = load_dataset("cifar10", "test", data_dir=shared_data, cache_dir=tmp_path / "cache")
    assert f"image archive {archive}" in ds.source and "cached at" in ds.source
    assert ds.images.shape == (10000, 32, 32, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.class_counts(), np.full(10, 1000))
    mean = ds.images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.4941, 0.4851, 0.4504], atol=1e-4)
    again = load_dataset("cifar10", "test", data_dir=shared_data, cache_dir=tmp_path / "cache")
    assert "from cache" in again.source
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("", "skip")])
def test_missing_shared_data_fails_only_in_ci(monkeypatch, ci, outcome):
    from tests import conftest

    monkeypatch.setattr(conftest, "find_shared_data", lambda: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="shared data folder not found"):
        conftest.require_shared_data()
