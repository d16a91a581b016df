"""Host-side pipeline: Dataset checks, batch_iterator, take, split_validation, normalization."""

import numpy as np
import pytest

from gcgd_jax.data import (
    Dataset,
    batch_iterator,
    normalization,
    num_batches,
    split_validation,
    synthetic_dataset,
    take,
)


def _ds(n=10, num_classes=3, labels=None):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    labels = np.arange(n) % num_classes if labels is None else np.asarray(labels)
    return Dataset(images, labels.astype(np.int32), num_classes, "toy", "train", "test")


def test_dataset_validates_its_arrays():
    ds = _ds()
    assert len(ds) == 10 and ds.image_shape == (2, 2, 1)
    np.testing.assert_array_equal(ds.class_counts(), [4, 3, 3])
    with pytest.raises(ValueError, match="images must be a uint8 array"):
        Dataset(ds.images.astype(np.float32), ds.labels, 3, "toy", "train", "")
    with pytest.raises(ValueError, match="labels must be an int32 array"):
        Dataset(ds.images, ds.labels.astype(np.int64), 3, "toy", "train", "")
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        Dataset(ds.images, ds.labels[:9], 3, "toy", "train", "")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        Dataset(ds.images, ds.labels, 2, "toy", "train", "")
    with pytest.raises(AttributeError):
        ds.name = "other"  # frozen


def test_num_batches():
    assert num_batches(10, 3) == 3 and num_batches(10, 3, drop_remainder=False) == 4
    assert num_batches(9, 3, False) == 3
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0)


def test_batch_iterator_order_is_the_documented_permutation():
    ds = _ds(10)
    batches = list(batch_iterator(ds, 3, seed=5, epoch=2))
    order = np.random.default_rng((5, 2)).permutation(10)
    assert len(batches) == 3
    for b, (x, y) in enumerate(batches):
        idx = order[3 * b : 3 * b + 3]
        np.testing.assert_array_equal(x[:, 0, 0, 0], idx)
        np.testing.assert_array_equal(y, ds.labels[idx])
    again = list(batch_iterator(ds, 3, seed=5, epoch=2))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    other = next(batch_iterator(ds, 3, seed=5, epoch=3))[0]
    assert not np.array_equal(other, batches[0][0])
    # The run's seed changes the order too (same epoch, other seeds).
    firsts = {
        next(batch_iterator(ds, 3, seed=s, epoch=2))[0][:, 0, 0, 0].tobytes() for s in range(4)
    }
    assert len(firsts) == 4


def test_batch_iterator_start_batch_resumes_the_same_epoch():
    ds = _ds(20)
    full = list(batch_iterator(ds, 4, seed=0, epoch=1))
    rest = list(batch_iterator(ds, 4, seed=0, epoch=1, start_batch=3))
    assert len(rest) == 2
    for a, b in zip(full[3:], rest, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert list(batch_iterator(ds, 4, seed=0, epoch=1, start_batch=5)) == []
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 5\]"):
        next(batch_iterator(ds, 4, seed=0, epoch=1, start_batch=6))


def test_batch_iterator_remainder_and_no_shuffle():
    ds = _ds(10)
    xs = [x[:, 0, 0, 0] for x, _ in batch_iterator(ds, 4, seed=0, epoch=0, shuffle=False,
                                                   drop_remainder=False)]  # fmt: skip
    assert [list(x) for x in xs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sum(len(x) for x, _ in batch_iterator(ds, 4, seed=0, epoch=0)) == 8
    with pytest.raises(ValueError, match="gives no batches"):
        next(batch_iterator(ds, 11, seed=0, epoch=0))


def test_take_stratified_and_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    ds = _ds(100, 3, labels)
    sub = take(ds, 10)
    np.testing.assert_array_equal(sub.class_counts(), [5, 3, 2])
    np.testing.assert_array_equal(sub.images[:, 0, 0, 0], [0, 1, 2, 3, 4, 50, 51, 52, 80, 81])
    r1, r2 = take(ds, 10, seed=3), take(ds, 10, seed=3)
    np.testing.assert_array_equal(r1.images, r2.images)
    np.testing.assert_array_equal(r1.class_counts(), [5, 3, 2])
    assert np.all(np.diff(r1.images[:, 0, 0, 0].astype(int)) > 0)  # original order kept
    assert not np.array_equal(r1.images, take(ds, 10, seed=4).images)
    odd = take(ds, 7)  # 3.5 / 2.1 / 1.4 -> largest remainders
    np.testing.assert_array_equal(odd.class_counts(), [4, 2, 1])
    plain = take(ds, 10, stratified=False)
    np.testing.assert_array_equal(plain.images[:, 0, 0, 0], np.arange(10))
    assert len(take(ds, 100)) == 100 and "take(10" in sub.source
    with pytest.raises(ValueError, match="cannot take 101"):
        take(ds, 101)


def test_split_validation_is_stratified_disjoint_and_complete():
    ds = synthetic_dataset(500, (4, 4, 1), num_classes=5, seed=1)
    train, val = split_validation(ds, 0.1, seed=0)
    assert (len(train), len(val)) == (450, 50)
    assert (train.split, val.split) == ("train", "validation")
    np.testing.assert_array_equal(val.class_counts(), [10] * 5)
    np.testing.assert_array_equal(train.class_counts() + val.class_counts(), ds.class_counts())
    both = np.concatenate([train.images, val.images]).reshape(500, -1)
    assert len(np.unique(both, axis=0)) == len(np.unique(ds.images.reshape(500, -1), axis=0))
    again, _ = split_validation(ds, 0.1, seed=0)
    np.testing.assert_array_equal(again.images, train.images)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="fraction"):
            split_validation(ds, bad, seed=0)


def test_normalization_values():
    mean, std = normalization("fashion-mnist")
    assert mean.dtype == np.float32 and mean.shape == (1,)
    np.testing.assert_allclose((mean, std), ([0.2860], [0.3530]))
    np.testing.assert_allclose(normalization("mnist"), ([0.1307], [0.3081]))
    mean, std = normalization("cifar10")
    assert mean.shape == std.shape == (3,)
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465])
    assert normalization("cifar100")[0].shape == (3,) and normalization("imagenet")[1].shape == (3,)
    np.testing.assert_allclose(normalization("synthetic"), ([0.5], [0.25]))
