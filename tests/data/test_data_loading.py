"""`load_dataset`: names, source order, the 'nothing found' error, and the decode cache."""

import importlib.util
import os

import numpy as np
import pytest

from gcgd_jax import data
from gcgd_jax.data import DataFormatError, DatasetNotFoundError, formats, load_dataset, loading

needs_pil = pytest.mark.skipif(
    importlib.util.find_spec("PIL") is None, reason="Pillow (the data extra) not installed"
)


def test_names_and_splits():
    with pytest.raises(ValueError, match=r"unknown data set 'svhn'; known: cifar10, cifar100, "
                       r"fashion_mnist, imagenet, mnist, synthetic"):  # fmt: skip
        load_dataset("svhn")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist", "validation")
    assert data.canonical_name("Fashion-MNIST") == "fashion_mnist"
    assert set(data.DATASETS) == {"cifar10", "cifar100", "fashion_mnist", "imagenet", "mnist",
                                  "synthetic"}  # fmt: skip


def test_synthetic_is_deterministic_and_learnable():
    a = load_dataset("synthetic", "train")
    b = data.synthetic_dataset(2048, (32, 32, 3), 10, seed=0)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    test = load_dataset("synthetic", "test")
    assert (len(a), len(test), a.num_classes, a.image_shape) == (2048, 512, 10, (32, 32, 3))
    assert not np.array_equal(a.images[:512], test.images)
    np.testing.assert_array_equal(a.class_counts(), np.full(10, 2048 // 10) + (np.arange(10) < 8))
    # Learnable: a nearest-class-mean classifier fit on train is near perfect on test.
    x = a.images.reshape(len(a), -1).astype(np.float32)
    means = np.stack([x[a.labels == k].mean(0) for k in range(10)])
    xt = test.images.reshape(len(test), -1).astype(np.float32)
    pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.95
    # Stats close to normalization("synthetic") = (0.5, 0.25).
    assert abs(a.images.mean() / 255 - 0.5) < 0.05 and abs(a.images.std() / 255 - 0.25) < 0.05
    small = data.synthetic_dataset(7, (5, 6, 1), num_classes=3, seed=4)
    assert small.images.shape == (7, 5, 6, 1) and small.labels.max() < 3


def test_default_roots_include_cwd_and_repo_relative_shared_data(tmp_path, monkeypatch):
    monkeypatch.delenv("GCGD_SHARED_DATA", raising=False)
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    roots = loading.default_search_roots()
    repo = loading._repo_root()
    assert (repo / "gcgd_jax" / "data" / "loading.py").is_file()
    assert roots == [
        (tmp_path / "shared" / "data").resolve(),
        (repo / ".." / "shared" / "data").resolve(),
    ]
    monkeypatch.setenv("GCGD_SHARED_DATA", str(tmp_path / "s"))
    assert loading.default_search_roots()[0] == (tmp_path / "s").resolve()


def test_source_order(tmp_path, monkeypatch, isolated_roots, helpers):
    shared = isolated_roots  # tmp/shared/data: ../shared/data of the working directory
    helpers.write_mnist(shared / "mnist", "train", 7, seed=1)
    assert len(load_dataset("mnist")) == 7
    # $GCGD_SHARED_DATA comes before ../shared/data.
    helpers.write_mnist(tmp_path / "env-shared" / "MNIST" / "raw", "train", 6, gz=False)
    monkeypatch.setenv("GCGD_SHARED_DATA", str(tmp_path / "env-shared"))
    ds = load_dataset("mnist")
    assert len(ds) == 6 and "MNIST/raw" in ds.source
    # An explicit folder (GCGD_DATA_DIR, then data_dir=) comes first, and alone.
    helpers.write_mnist(tmp_path / "env-dir", "train", 5)
    monkeypatch.setenv("GCGD_DATA_DIR", str(tmp_path / "env-dir"))
    assert len(load_dataset("mnist")) == 5
    helpers.write_mnist(tmp_path / "arg-dir" / "mnist", "train", 4)
    assert len(load_dataset("mnist", data_dir=tmp_path / "arg-dir")) == 4
    with pytest.raises(DatasetNotFoundError, match="only that folder is searched"):
        load_dataset("mnist", "test", data_dir=tmp_path / "arg-dir")


def test_repo_relative_root_and_debian_folder(tmp_path, monkeypatch, isolated_roots, helpers):
    monkeypatch.setattr(loading, "_repo_root", lambda: tmp_path / "r" / "repo")
    helpers.write_mnist(tmp_path / "r" / "shared" / "data" / "fashion-mnist", "test", 3)
    assert len(load_dataset("fashion-mnist", "test")) == 3
    monkeypatch.setattr(loading, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    helpers.write_mnist(tmp_path / "debian", "train", 2)  # files directly in the folder
    ds = load_dataset("fashion_mnist")
    assert len(ds) == 2 and str(tmp_path / "debian") in ds.source
    with pytest.raises(DatasetNotFoundError):  # the Debian folder is for Fashion-MNIST only
        load_dataset("mnist")


def test_nothing_found_lists_what_was_tried(tmp_path, isolated_roots):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", "test")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "no data found for 'cifar100' split 'test'. Tried, in order:" in msg
    assert f"1. tensorflow-datasets 'cifar100' in {tmp_path / 'tfds'}: not prepared" in msg
    assert f"2. local files in {isolated_roots.resolve()}: folder does not exist" in msg
    assert "3. download: not allowed (download=False)" in msg
    assert "cifar-100-python/ or cifar-100-python.tar.gz" in msg
    assert "To fix: pass data_dir=" in msg and "GCGD_DATA_DIR" in msg and "download=True" in msg
    isolated_roots.mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"local files in .*shared/data: none found"):
        load_dataset("cifar100", "test")


def test_found_but_corrupt_does_not_fall_back(tmp_path, monkeypatch, isolated_roots, helpers):
    helpers.write_mnist(isolated_roots / "mnist", "test", 3)  # a good copy later in the order
    bad = tmp_path / "first"
    helpers.write_mnist(bad / "mnist", "test", 3)
    (bad / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    monkeypatch.setenv("GCGD_SHARED_DATA", str(bad))
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test")


@needs_pil
def test_decoded_images_are_cached(tmp_path, monkeypatch, helpers):
    per_class = {str(k): helpers.random_images(2, (28, 28, 1), k) for k in range(10)}
    helpers.write_image_folder(tmp_path / "d" / "fashion_mnist" / "test", per_class)
    cache = tmp_path / "c"
    first = load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d", cache_dir=cache)
    assert "cached at" in first.source
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temp files left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(formats, "decode_image", no_decoding)
    second = load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d", cache_dir=cache)
    assert "from cache" in second.source
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.images.dtype == np.uint8 and second.labels.dtype == np.int32
    # Default cache folder is $GCGD_CACHE_DIR (set by the fixture): a miss, so it decodes.
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d")
    # Touching a source file changes the key: decoded again.
    some_file = tmp_path / "d" / "fashion_mnist" / "test" / "4" / "0001.png"
    os.utime(some_file, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d", cache_dir=cache)
    with pytest.raises(AssertionError, match="decoded again"):  # caching off
        load_dataset("fashion_mnist", "test", data_dir=tmp_path / "d", cache_dir=False)


@needs_pil
def test_unreadable_cache_entry_is_rebuilt(tmp_path, helpers):
    helpers.write_image_folder(
        tmp_path / "mnist" / "train",
        {str(k): helpers.random_images(1, (28, 28, 1)) for k in range(10)},
    )
    first = load_dataset("mnist", data_dir=tmp_path)
    entry = first.source.rsplit("cached at ", 1)[1].rstrip(")")
    with open(entry, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        again = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(again.images, first.images)
    assert "cached at" in again.source


def test_download_is_the_last_step_and_only_when_allowed(tmp_path, monkeypatch, isolated_roots):
    from gcgd_jax.data import tfds_source

    calls = []

    def fake_open(name, split, data_dir, *, download=False):
        calls.append((name, split, str(data_dir), download))
        raise tfds_source.TfdsUnavailable("offline")

    monkeypatch.setattr(tfds_source, "open_source", fake_open)
    with pytest.raises(DatasetNotFoundError, match="download: not allowed"):
        load_dataset("cifar10")
    assert calls == [("cifar10", "train", str(tmp_path / "tfds"), False)]
    calls.clear()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "test", download=True)
    assert calls[-1] == ("cifar10", "test", str(tmp_path / "tfds"), True)
    assert f"3. download of tensorflow-datasets 'cifar10' into {tmp_path / 'tfds'}: offline" in str(
        info.value
    )
    calls.clear()
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", data_dir=tmp_path / "mine", download=True)
    assert [c[2:] for c in calls] == [
        (str(tmp_path / "mine"), False),
        (str(tmp_path / "mine"), True),
    ]


def test_missing_pillow_gives_a_clear_error(tmp_path, monkeypatch):
    import sys

    for k in range(10):
        (tmp_path / "mnist" / "test" / str(k)).mkdir(parents=True)
        (tmp_path / "mnist" / "test" / str(k) / "0.png").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"needs Pillow: pip install 'gcgd-jax\[data\]'"):
        load_dataset("mnist", "test", data_dir=tmp_path, cache_dir=False)
