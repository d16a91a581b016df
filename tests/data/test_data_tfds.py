"""The tensorflow-datasets source, with ``tfds.testing.mock_data`` (no TensorFlow, no download)."""

import sys

import numpy as np
import pytest

from gcgd_jax.data import load_dataset, tfds_source

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def prepared(tmp_path):
    """A TFDS_DATA_DIR (set by the autouse fixture) where the data sets 'are prepared'."""

    def make(name):
        (tmp_path / "tfds" / name).mkdir(parents=True, exist_ok=True)

    return make


@pytest.mark.parametrize(
    "name,shape,classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_prepared_tfds_comes_first(prepared, isolated_roots, helpers, name, shape, classes):
    helpers.write_mnist(isolated_roots / "mnist", "test", 3)  # a local copy, later in the order
    prepared(name)
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset(name, "test", cache_dir=False)
    assert (len(ds), ds.images.shape[1:], ds.num_classes, ds.name) == (6, shape, classes, name)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    assert ds.labels.max() < classes
    assert f"tensorflow-datasets {name}/" in ds.source
    assert "tensorflow" not in sys.modules  # read without TensorFlow


def test_tfds_in_explicit_data_dir_and_cache(tmp_path, monkeypatch):
    (tmp_path / "d" / "fashion_mnist").mkdir(parents=True)
    with tfds.testing.mock_data(num_examples=4):
        first = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
        assert "cached at" in first.source

        def no_reading(*args, **kwargs):
            raise AssertionError("read again")

        monkeypatch.setattr(tfds_source, "read_examples", no_reading)
        second = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    assert "from cache" in second.source
    np.testing.assert_array_equal(first.images, second.images)


def test_imagenet_is_resized_and_uses_validation_for_test(prepared):
    pytest.importorskip("PIL")
    prepared("imagenet2012")
    with tfds.testing.mock_data(num_examples=3):
        ds = load_dataset("imagenet", "test", image_size=16, cache_dir=False)
    assert ds.images.shape == (3, 16, 16, 3) and ds.num_classes == 1000
    assert "split 'validation'" in ds.source and "resized to 16" in ds.source


def test_center_crop_resize():
    pytest.importorskip("PIL")
    image = np.zeros((40, 20, 3), np.uint8)
    image[6:34] = 255  # white around the central 20x20 square, black at the ends
    out = tfds_source.center_crop_resize(image, 10)
    assert out.shape == (10, 10, 3) and out.min() == 255
    assert tfds_source.center_crop_resize(image.transpose(1, 0, 2), 10).min() == 255


def test_unprepared_folder_is_reported(tmp_path, isolated_roots):
    (tmp_path / "tfds" / "cifar100").mkdir(parents=True)  # exists, but nothing prepared in it
    with pytest.raises(FileNotFoundError, match=r"'cifar100' in .*tfds: not prepared there"):
        load_dataset("cifar100")
