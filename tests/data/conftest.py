"""Fixtures for the data tests: an isolated environment and small files written by the tests
(the ``shared_data`` fixture is in ``tests/conftest.py``)."""

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Cache in tmp, no prepared tensorflow-datasets, no data folder from the environment."""
    monkeypatch.setenv("GCGD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.delenv("GCGD_DATA_DIR", raising=False)


@pytest.fixture
def isolated_roots(tmp_path, monkeypatch):
    """Makes the default search roots ``tmp/shared/data`` (cwd ``tmp/work``, repo ``tmp/repo``)."""
    from gcgd_jax.data import loading

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(loading, "_repo_root", lambda: tmp_path / "repo")
    monkeypatch.delenv("GCGD_SHARED_DATA", raising=False)
    monkeypatch.setattr(loading, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    return tmp_path / "shared" / "data"


def random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_mnist(folder: Path, split: str, n: int, *, gz: bool = True, seed: int = 0):
    """Writes an IDX pair of ``n`` random 28x28 images; returns (images (N,28,28,1), labels)."""
    from gcgd_jax.data import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    images = random_images(n, (28, 28), seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images[..., None], labels.astype(np.int32)


def write_image_folder(split_dir: Path, per_class: dict, ext: str = ".png"):
    """Writes ``split_dir/<class>/<i>.<ext>`` from ``{class: (n, H, W, C) uint8}``."""
    from PIL import Image

    for cls, images in per_class.items():
        (split_dir / cls).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(
                split_dir / cls / f"{i:04d}{ext}"
            )


@pytest.fixture
def helpers():
    """The writers above, for tests (conftest modules are not imported by name)."""
    import types

    return types.SimpleNamespace(
        random_images=random_images, write_mnist=write_mnist, write_image_folder=write_image_folder
    )
