"""Rebuild the Fashion-MNIST sample bundled in ``gcgd_jax/data/sample/``.

A stratified subset of the official Fashion-MNIST release: 1,200 training and
200 test images per class (12,000 / 2,000), chosen with a fixed seed, kept in
their original order, written as gzip-compressed IDX files (the official
format) with a ``SHA256SUMS`` manifest that the loader checks.

Usage::

    python -m experiments.tools.make_fmnist_sample --source ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

from experiments import REPO
from gcgd_jax.data import formats

OUT = REPO / "gcgd_jax" / "data" / "sample"
PER_CLASS = {"train": 1200, "test": 200}
PREFIX = {"train": "train", "test": "t10k"}


def stratified(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def _write_gz(path: Path, payload: bytes) -> None:
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f,
    ):
        f.write(payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of the official *.gz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    sums = []
    for split, per_class in PER_CLASS.items():
        p = PREFIX[split]
        images, labels = formats.load_idx_pair(
            args.source / f"{p}-images-idx3-ubyte.gz",
            args.source / f"{p}-labels-idx1-ubyte.gz",
            10,
            (28, 28),
        )
        idx = stratified(labels, per_class, args.seed + (split == "test"))
        imgs = images[idx].reshape(-1, 28, 28).astype(np.uint8)
        labs = labels[idx].astype(np.uint8)
        n = len(idx)
        files = {
            f"{p}-images-idx3-ubyte.gz": np.array([2051, n, 28, 28], ">u4").tobytes()
            + imgs.tobytes(),
            f"{p}-labels-idx1-ubyte.gz": np.array([2049, n], ">u4").tobytes() + labs.tobytes(),
        }
        for name, payload in files.items():
            _write_gz(OUT / name, payload)
            sums.append(f"{hashlib.sha256((OUT / name).read_bytes()).hexdigest()}  {name}")
        print(f"{split}: {n} images, per class {np.bincount(labs).tolist()}")
    (OUT / "SHA256SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    main()
