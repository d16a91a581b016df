"""Readers of the standard formats, on small files the tests write: IDX, CIFAR, image folders."""

import gzip
import importlib.util
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from gcgd_jax.data import DataFormatError, load_dataset, read_idx, write_idx
from gcgd_jax.data.formats import load_idx_pair

# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("ext", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 0, 9], np.uint8),
        np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        np.linspace(-1, 1, 5, dtype=np.float32),
    ],
    ids=["images", "labels", "int32", "float32"],
)
def test_idx_round_trip(tmp_path, array, ext):
    path = write_idx(tmp_path / f"a-idx{ext}", array)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_idx_header_is_the_official_one(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 28, 28), np.uint8))
    assert path.read_bytes()[:16] == bytes.fromhex("00000803000000020000001c0000001c")
    path = write_idx(tmp_path / "y", np.zeros(5, np.uint8))
    assert path.read_bytes()[:8] == bytes.fromhex("0000080100000005")


def test_idx_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte.*magic number 0x12340803"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + bytes(8))  # unknown type code
    with pytest.raises(DataFormatError, match="magic"):
        read_idx(path)


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_idx_truncated_and_too_long(tmp_path, ext):
    good = write_idx(tmp_path / "ok", np.ones((3, 28, 28), np.uint8)).read_bytes()
    path = tmp_path / f"t10k-images-idx3-ubyte{ext}"
    for payload, state in [
        (good[:-1], "truncated"),
        (good + b"\0", "too long"),
        (good[:10], "trunc"),
    ]:
        path.write_bytes(gzip.compress(payload) if ext else payload)
        with pytest.raises(DataFormatError, match=rf"{path.name}.*{state}"):
            read_idx(path)


def test_truncated_gzip_stream_names_the_file(tmp_path):
    blob = gzip.compress(bytes(4) + bytes(10_000))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz.*gzip"):
        read_idx(path)


def test_idx_pair_checks(tmp_path):
    imgs = write_idx(tmp_path / "i", np.zeros((4, 28, 28), np.uint8))
    lbls = write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"4 images but .*3 labels"):
        load_idx_pair(imgs, lbls, 10, (28, 28))
    with pytest.raises(DataFormatError, match=r"/l: expected IDX images"):  # swapped files
        load_idx_pair(lbls, imgs, 10, (28, 28))
    bad = write_idx(tmp_path / "b", np.array([0, 1, 2, 10], np.uint8))
    with pytest.raises(DataFormatError, match=r"/b: labels must lie in \[0, 10\)"):
        load_idx_pair(imgs, bad, 10, (28, 28))
    small = write_idx(tmp_path / "s", np.zeros((4, 27, 28), np.uint8))
    with pytest.raises(DataFormatError, match=r"/s: images are 27x28, expected 28x28"):
        load_idx_pair(small, bad, 10, (28, 28))


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_from_idx_folder(tmp_path, helpers, gz):
    images, labels = helpers.write_mnist(tmp_path / "d", "test", 12, gz=gz)
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "d")
    assert (ds.name, ds.split, ds.num_classes, len(ds)) == ("mnist", "test", 10, 12)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (12, 28, 28, 1)
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert str(tmp_path / "d" / "t10k-images-idx3-ubyte") in ds.source


def test_corrupt_idx_in_data_dir_is_an_error_not_fewer_examples(tmp_path, helpers):
    helpers.write_mnist(tmp_path, "train", 5, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-28])  # one row short
    with pytest.raises(DataFormatError, match=str(path)):
        load_dataset("fashion_mnist", data_dir=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataFormatError, match="no labels file"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- CIFAR


def _cifar_arrays(n, seed):
    """``n`` random CIFAR rows (N, 3072) and the same images as NHWC."""
    rows = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    return rows, rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)


def _write_cifar10(folder, *, binary=False, bytes_keys=True):
    """Five train batches of 3 and a test batch of 2; returns (train NHWC, labels)."""
    folder.mkdir(parents=True)
    images, labels = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 2 if name == "test_batch" else 3
        rows, nhwc = _cifar_arrays(n, seed=i)
        lab = [(i + j) % 10 for j in range(n)]
        if binary:
            recs = np.concatenate([np.array(lab, np.uint8)[:, None], rows], axis=1)
            (folder / f"{name}.bin").write_bytes(recs.tobytes())
        else:
            key = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
            batch = {key("data"): rows, key("labels"): lab, key("batch_label"): b"x"}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        if name != "test_batch":
            images.append(nhwc)
            labels += lab
    return np.concatenate(images), np.array(labels, np.int32)


@pytest.mark.parametrize("binary", [False, True], ids=["python", "binary"])
def test_cifar10_batches(tmp_path, binary):
    sub = "cifar-10-batches-bin" if binary else "cifar-10-batches-py"
    images, labels = _write_cifar10(tmp_path / sub, binary=binary)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert ds.images.shape == (15, 32, 32, 3) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(test) == 2 and sub in test.source


def test_cifar10_python_with_str_keys_and_as_official_archive(tmp_path):
    images, labels = _write_cifar10(tmp_path / "src" / "cifar-10-batches-py", bytes_keys=False)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=tmp_path, cache_dir=False)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert "cifar-10-python.tar.gz" in ds.source


def test_cifar100_python_and_binary_use_fine_labels(tmp_path):
    rows, nhwc = _cifar_arrays(4, seed=3)
    fine, coarse = [99, 0, 42, 7], [19, 0, 5, 3]
    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    batch = {b"data": rows, b"fine_labels": fine, b"coarse_labels": coarse}
    (py / "test").write_bytes(pickle.dumps(batch, protocol=2))
    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    recs = np.concatenate([np.array([coarse, fine], np.uint8).T, rows], axis=1)
    (binary / "test.bin").write_bytes(recs.tobytes())
    for root in ("py", "bin"):
        ds = load_dataset("cifar100", "test", data_dir=tmp_path / root)
        assert ds.num_classes == 100
        np.testing.assert_array_equal(ds.images, nhwc)
        np.testing.assert_array_equal(ds.labels, fine)


def test_cifar_corrupt_files_name_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar10(folder, binary=True)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(
        DataFormatError, match=r"data_batch_3\.bin: size .* not a positive multiple"
    ):
        load_dataset("cifar10", data_dir=tmp_path)
    bad.unlink()
    with pytest.raises(
        DataFormatError, match=r"incomplete CIFAR binary batches, missing data_batch_3"
    ):
        load_dataset("cifar10", data_dir=tmp_path)

    py = tmp_path / "p" / "cifar-10-batches-py"
    _write_cifar10(py)
    rows, _ = _cifar_arrays(2, 0)
    (py / "test_batch").write_bytes(pickle.dumps({"data": rows[:, :-1], "labels": [0, 1]}))
    with pytest.raises(DataFormatError, match=r"test_batch: 'data' must be uint8 of shape"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "p")
    (py / "test_batch").write_bytes(pickle.dumps({"data": rows, "labels": [0]}))
    with pytest.raises(DataFormatError, match=r"test_batch: 'labels' must hold 2 integer labels"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "p")
    (py / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match=r"test_batch: not a readable CIFAR python batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "p")


def test_cifar_pickles_of_python2_numpy_1_and_numpy_scalars_load():
    from gcgd_jax.data.formats import parse_cifar_python

    rows, nhwc = _cifar_arrays(2, 0)
    labels = [np.int64(3), np.int64(9)]
    blob = pickle.dumps({b"data": rows, b"labels": labels}, protocol=2)
    # The official batches were pickled by Python 2 / NumPy 1: numpy.core.multiarray.
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    images, out = parse_cifar_python(blob, "batch", "labels", 10)
    np.testing.assert_array_equal(images, nhwc)
    np.testing.assert_array_equal(out, [3, 9])


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    py = tmp_path / "cifar-100-python"
    py.mkdir()
    target = str(tmp_path / "pwned")
    (py / "train").write_bytes(pickle.dumps({"data": _Evil(target), "fine_labels": []}))
    with pytest.raises(DataFormatError, match="refusing to unpickle"):
        load_dataset("cifar100", data_dir=tmp_path)
    assert not os.path.exists(target)


# ----------------------------------------------------------------------------- image files

needs_pil = pytest.mark.skipif(
    importlib.util.find_spec("PIL") is None, reason="Pillow (the data extra) not installed"
)


def _classes(helpers, names, n, shape, seed=0):
    return {c: helpers.random_images(n, shape, seed + i) for i, c in enumerate(names)}


@needs_pil
def test_image_folder_png_grayscale_numbered_classes(tmp_path, helpers):
    per_class = _classes(helpers, [str(i) for i in range(10)], 2, (28, 28, 1))
    helpers.write_image_folder(tmp_path / "mnist" / "train", per_class)
    ds = load_dataset("mnist", data_dir=tmp_path, cache_dir=False)
    assert ds.images.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(ds.images, np.concatenate([per_class[str(i)] for i in range(10)]))


@needs_pil
def test_image_folder_class_names_get_official_indices(tmp_path, helpers):
    names = [
        "truck",
        "ship",
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
    ]
    per_class = _classes(helpers, names, 1, (32, 32, 3))
    helpers.write_image_folder(tmp_path / "test", per_class)  # data_dir/<split>/<class>
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, cache_dir=False)
    np.testing.assert_array_equal(ds.labels, np.arange(10))
    np.testing.assert_array_equal(ds.images[9], per_class["truck"][0])
    np.testing.assert_array_equal(ds.images[0], per_class["airplane"][0])


@needs_pil
def test_image_folder_jpeg_decodes_close_to_original(tmp_path, helpers):
    smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3))
    per_class = {f"c{i:02d}": np.stack([np.roll(smooth, 3 * i, axis=1)]) for i in range(10)}
    helpers.write_image_folder(tmp_path / "cifar10-jpeg" / "train", per_class, ext=".jpg")
    ds = load_dataset("cifar10", data_dir=tmp_path, cache_dir=False)
    assert ds.images.shape == (10, 32, 32, 3)
    err = np.abs(ds.images.astype(int) - np.stack([v[0] for v in per_class.values()])).mean()
    assert err < 4, err


@needs_pil
@pytest.mark.parametrize("top", ["cifar10-jpeg/", ""])
def test_image_tar_gz(tmp_path, helpers, top):
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    per_train = _classes(helpers, names, 2, (32, 32, 3))
    per_test = _classes(helpers, names, 1, (32, 32, 3), seed=50)
    helpers.write_image_folder(tmp_path / "src" / "train", per_train)
    helpers.write_image_folder(tmp_path / "src" / "test", per_test)
    archive = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tmp_path / "src" / split, arcname=f"{top}{split}")
    ds = load_dataset("cifar10", data_dir=tmp_path / "data", cache_dir=False)
    np.testing.assert_array_equal(ds.images, np.concatenate([per_train[c] for c in names]))
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10), 2))
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "data", cache_dir=False)
    np.testing.assert_array_equal(test.images, np.concatenate([per_test[c] for c in names]))
    assert str(archive) in ds.source


@needs_pil
def test_bad_images_name_the_file(tmp_path, helpers):
    per_class = _classes(helpers, [str(i) for i in range(10)], 1, (28, 28, 1))
    helpers.write_image_folder(tmp_path / "mnist" / "test", per_class)
    bad = tmp_path / "mnist" / "test" / "3" / "0000.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataFormatError, match=rf"{bad}: cannot decode image"):
        load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=False)
    helpers.write_image_folder(bad.parent, {"": helpers.random_images(1, (27, 28, 1))})
    with pytest.raises(
        DataFormatError, match=rf"{bad}: image is 28x27 with 1 channel\(s\), expected 28x28"
    ):
        load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=False)
    (tmp_path / "mnist" / "test" / "10").mkdir()
    with pytest.raises(DataFormatError, match=r"found 11 class folders, expected 10"):
        load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=False)


@needs_pil
def test_truncated_image_archive_names_the_archive(tmp_path, helpers):
    per_class = _classes(helpers, [str(i) for i in range(10)], 3, (28, 28, 1))
    helpers.write_image_folder(tmp_path / "src" / "train", per_class)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    archive = tmp_path / "fashion-mnist.tar.gz"
    archive.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataFormatError, match=rf"{archive}: corrupt or truncated archive"):
        load_dataset("fashion_mnist", data_dir=tmp_path, cache_dir=False)
