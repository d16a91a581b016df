"""The tensorflow-datasets source on a really prepared data set (no TensorFlow, no download).

``_prepare`` writes what ``tfds build --file_format=array_record`` leaves behind: the
registered builder's ``dataset_info.json`` / ``features.json`` and an array_record shard
of serialised ``tf.train.Example`` records (PNG images), using tfds' own protos and the
``array_record`` writer, so ``tfds.data_source`` and the loader's reading code run for
real. TensorFlow is not needed to read (nor installed by the project's extras).
"""

import io
import sys

import numpy as np
import pytest

from gcgd_jax.data import load_dataset, tfds_source

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("PIL")
pytest.importorskip("array_record")


@pytest.fixture(autouse=True)
def no_tensorflow():
    """Reading must not need TensorFlow. The ``data`` and ``dev`` extras do not install it,
    so there any use of it fails the read; where it is installed, it must not get imported."""
    yield
    assert "tensorflow" not in sys.modules


def _example(features, image, label):
    from PIL import Image
    from tensorflow_datasets.proto import tf_example_pb2

    example = tf_example_pb2.Example()
    for key, feature in features.items():
        value = example.features.feature[key]
        if isinstance(feature, tfds.features.Image):
            png = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, "PNG")
            value.bytes_list.value.append(png.getvalue())
        elif isinstance(feature, tfds.features.ClassLabel):
            value.int64_list.value.append(int(label) if key == "label" else 0)
        else:  # Text: an id or a file name
            value.bytes_list.value.append(b"example")
    return example.SerializeToString()


def _prepare(data_dir, name, split, images, labels):
    """A prepared ``name``/``split`` in ``data_dir`` holding ``images`` and ``labels``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    folder = builder.data_path
    folder.mkdir(parents=True, exist_ok=True)
    template = tfds.core.ShardedFileTemplate(
        data_dir=folder, dataset_name=name, split=split, filetype_suffix="array_record",
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
    )  # fmt: skip
    shard = folder / f"{name}-{split}.array_record-00000-of-00001"
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for image, label in zip(images, labels):
        writer.write(_example(builder.info.features, image, label))
    writer.close()
    info = builder.info
    split_info = tfds.core.SplitInfo(
        name=split, shard_lengths=[len(labels)], num_bytes=0, filename_template=template
    )
    info.set_splits(tfds.core.SplitDict([split_info]))
    info.write_to_directory(folder)


def _data(n, shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), (np.arange(n) * 7) % classes


@pytest.mark.parametrize(
    "name,tfds_name,shape,classes",
    [
        ("mnist", "mnist", (28, 28, 1), 10),
        ("cifar10", "cifar10", (32, 32, 3), 10),
        ("cifar100", "cifar100", (32, 32, 3), 100),
    ],
)
def test_prepared_tfds_comes_first(
    tmp_path, isolated_roots, helpers, name, tfds_name, shape, classes
):
    helpers.write_mnist(isolated_roots / "mnist", "test", 3)  # a local copy, later in the order
    images, labels = _data(6, shape, classes)
    _prepare(tmp_path / "tfds", tfds_name, "test", images, labels)  # TFDS_DATA_DIR
    ds = load_dataset(name, "test", cache_dir=False)
    assert (len(ds), ds.images.shape[1:], ds.num_classes, ds.name) == (6, shape, classes, name)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, images)  # PNG is lossless
    np.testing.assert_array_equal(ds.labels, labels)
    assert f"tensorflow-datasets {tfds_name}/" in ds.source


def test_tfds_in_explicit_data_dir_and_cache(tmp_path, monkeypatch):
    images, labels = _data(4, (28, 28, 1), 10, seed=1)
    _prepare(tmp_path / "d", "fashion_mnist", "train", images, labels)
    first = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    assert "cached at" in first.source and "tensorflow-datasets fashion_mnist/" in first.source
    np.testing.assert_array_equal(first.images, images)

    def no_reading(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(tfds_source, "read_examples", no_reading)
    second = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    assert "from cache" in second.source
    np.testing.assert_array_equal(first.images, second.images)


def test_imagenet_is_resized_and_uses_validation_for_test(tmp_path, isolated_roots):
    images = np.zeros((3, 40, 20, 3), np.uint8)
    images[:, 6:34] = 255  # white around the central 20x20 square, black ends: crop is white
    _prepare(tmp_path / "tfds", "imagenet2012", "validation", images, [1, 2, 999])
    ds = load_dataset("imagenet", "test", image_size=16, cache_dir=False)
    assert ds.images.shape == (3, 16, 16, 3) and ds.num_classes == 1000
    assert ds.images.min() == 255 and ds.labels.tolist() == [1, 2, 999]
    assert "split 'validation'" in ds.source and "resized to 16" in ds.source


def test_center_crop_resize():
    image = np.zeros((40, 20, 3), np.uint8)
    image[6:34] = 255  # white around the central 20x20 square, black at the ends
    out = tfds_source.center_crop_resize(image, 10)
    assert out.shape == (10, 10, 3) and out.min() == 255
    assert tfds_source.center_crop_resize(image.transpose(1, 0, 2), 10).min() == 255


def test_unprepared_folder_is_reported(tmp_path, isolated_roots):
    (tmp_path / "tfds" / "cifar100").mkdir(parents=True)  # exists, but nothing prepared in it
    with pytest.raises(FileNotFoundError, match=r"'cifar100' in .*tfds: not prepared there"):
        load_dataset("cifar100")
