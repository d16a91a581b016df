"""The Fashion-MNIST sample bundled with the package: the fallback of last resort."""

import shutil

import numpy as np
import pytest

from gcgd_jax.data import DataFormatError, DatasetNotFoundError, load_dataset, loading


def test_bundled_sample_is_used_when_nothing_else_is_found(isolated_roots, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_told_about_sample", False)
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert train.images.shape == (12000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (2000, 28, 28, 1)
    assert np.bincount(train.labels, minlength=10).tolist() == [1200] * 10  # stratified
    assert np.bincount(test.labels, minlength=10).tolist() == [200] * 10
    assert "bundled Fashion-MNIST sample" in train.source
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one line, once per process
    assert "using the sample bundled with the package" in err[0] and "--data-dir" in err[0]


def test_bundled_sample_images_are_real_fashion_mnist(isolated_roots, shared_data):
    """Every bundled test image is one of the official test images, with its label."""
    official = load_dataset("fashion_mnist", "test", data_dir=shared_data / "fashion-mnist")
    assert not isolated_roots.exists()  # the default places hold nothing
    sample = load_dataset("fashion_mnist", "test")
    index = {img.tobytes(): lab for img, lab in zip(official.images, official.labels)}
    assert all(index.get(img.tobytes()) == lab for img, lab in zip(sample.images, sample.labels))


def test_other_data_sets_and_explicit_folders_never_fall_back(isolated_roots, tmp_path):
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="only that folder is searched"):
        load_dataset("fashion_mnist", data_dir=tmp_path / "empty")


def test_a_missing_data_folder_is_a_one_line_error(isolated_roots, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert "\n" not in msg and "does not exist" in msg and "--data-dir" in msg
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="is not a readable folder"):
        load_dataset("fashion_mnist", data_dir=tmp_path / "file")


@pytest.mark.parametrize("damage", ["flip", "remove", "manifest"])
def test_a_damaged_sample_is_a_clear_error(isolated_roots, tmp_path, monkeypatch, damage):
    copy = tmp_path / "sample"
    shutil.copytree(loading.BUNDLED_SAMPLE, copy)
    target = copy / "t10k-images-idx3-ubyte.gz"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    else:
        (copy / "SHA256SUMS").unlink()
    monkeypatch.setattr(loading, "BUNDLED_SAMPLE", copy)
    with pytest.raises(DataFormatError) as info:
        load_dataset("fashion_mnist", "test")
    msg = str(info.value)
    assert ("corrupt" if damage == "flip" else "missing") in msg
    assert "reinstall" in msg and "\n" not in msg
