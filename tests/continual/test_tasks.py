"""Task sequences (:mod:`gcgd_jax.continual.tasks`) and GEM's ring-buffer memories
(:mod:`gcgd_jax.continual.memory`)."""

from __future__ import annotations

import numpy as np
import pytest

from gcgd_jax.continual.config import load_config
from gcgd_jax.continual.memory import EpisodicMemory, ring_buffer_slots
from gcgd_jax.continual.tasks import build_tasks, draw_angles, permutation_maps, rotation_map
from gcgd_jax.data import synthetic_dataset
from gcgd_jax.train.config import ConfigError
from tests.continual.tiny import TINY_SETTINGS


def _images(n: int, split: str, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ds = synthetic_dataset(n, (28, 28, 1), 10, seed=seed, split=split)
    return ds.images, ds.labels


ANGLES = [0.0, 90.0, 180.0, 270.0, 45.0, 135.0, 9.0, 17.3, 69.886, 123.4, 353.5, 400.0]


@pytest.mark.parametrize("angle", ANGLES)
def test_rotation_is_pillows(angle):
    """The pixel map rotates exactly as ``PIL.Image.rotate`` (GEM's data script), on every
    pixel, multiples of 90 degrees (transposes) and Pillow's fixed-point path alike."""
    image_module = pytest.importorskip("PIL.Image")
    images, _ = _images(12, "train")
    pixel_map = rotation_map(angle)
    for img in images[..., 0]:
        expected = np.asarray(image_module.fromarray(img, mode="L").rotate(angle))
        flat = np.concatenate([img.reshape(-1), [0]])
        np.testing.assert_array_equal(flat[pixel_map].reshape(28, 28), expected)


def test_rotation_map_properties():
    assert np.array_equal(rotation_map(0.0), np.arange(784))
    quarter = rotation_map(90.0).reshape(28, 28)
    assert quarter[0, 0] == 27  # counter-clockwise: the top-right pixel goes to the top left
    assert (rotation_map(45.0) == 784).sum() > 0  # blank corners


def test_permutations_and_angles():
    rng = np.random.default_rng(0)
    maps = permutation_maps(rng, 5)
    assert maps.shape == (5, 784) and maps.dtype == np.int32
    assert all(np.array_equal(np.sort(m), np.arange(784)) for m in maps)
    assert len({m.tobytes() for m in maps}) == 5
    angles = draw_angles(np.random.default_rng(1), 20, 0.0, 180.0)
    assert all(9 * t <= a < 9 * (t + 1) for t, a in enumerate(angles))  # one bin per task


def _gem_ring_buffer(num_tasks, samples, batch, memory):
    """GEM's ``observe`` (``model/gem.py``), its memory writes transcribed: the slots hold
    the position of the example within its task."""
    slots = np.full((num_tasks, memory), -1)
    mem_cnt = 0
    for t in range(num_tasks):
        for start in range(0, samples, batch):
            bsz = min(batch, samples - start)
            endcnt = min(mem_cnt + bsz, memory)
            effbsz = endcnt - mem_cnt
            slots[t, mem_cnt:endcnt] = np.arange(start, start + effbsz)
            mem_cnt += effbsz
            if mem_cnt == memory:
                mem_cnt = 0
    return slots


@pytest.mark.parametrize(
    "num_tasks, samples, batch, memory",
    [(20, 1000, 10, 256), (3, 50, 10, 10), (4, 60, 7, 13), (2, 30, 10, 3)],
)
def test_ring_buffer_is_gems(num_tasks, samples, batch, memory):
    ours = np.asarray(ring_buffer_slots(num_tasks, samples, batch, memory))
    np.testing.assert_array_equal(ours, _gem_ring_buffer(num_tasks, samples, batch, memory))


def test_every_slot_is_filled_when_the_configuration_is_valid():
    """memory_size <= samples_per_task, a multiple of batch_size (what the configuration
    check demands): then every task fills its whole memory, whatever the counter's start."""
    for batch in (1, 3, 10):
        for samples in range(batch, 8 * batch + 1, batch):
            for memory in range(1, samples + 1):
                slots = np.asarray(ring_buffer_slots(4, samples, batch, memory))
                assert (slots >= 0).all(), (batch, samples, memory)


def test_the_protocol_keeps_the_end_of_each_task():
    slots = np.asarray(ring_buffer_slots(20, 1000, 10, 256))
    assert (slots >= 0).all() and all(len(set(s)) == 256 for s in slots)
    assert slots.max() == 999 and slots.min() >= 1000 - 256 - 10  # the last ~256 examples


def test_episodic_memory_store_and_mask():
    memory = EpisodicMemory(3, 4, 5)
    memory.store(1, np.ones((4, 5)), np.arange(4))
    assert memory.x[1].sum() == 20 and memory.x[0].sum() == 0 and memory.y[1, 3] == 3
    assert memory.mask(0).tolist() == [False, False, False]
    assert memory.mask(2).tolist() == [True, True, False]


@pytest.mark.parametrize("benchmark", ["permuted_mnist", "rotated_mnist"])
def test_build_tasks(benchmark):
    cfg = load_config(None, [*TINY_SETTINGS, f"tasks.benchmark={benchmark}"])
    train, test = _images(300, "train"), _images(100, "test")
    tasks = build_tasks(cfg, train, test)
    again = build_tasks(cfg, train, test)
    assert np.array_equal(tasks.pixel_maps, again.pixel_maps)
    assert np.array_equal(tasks.train_ids, again.train_ids)  # a function of the seed
    assert tasks.num_tasks == 3 and tasks.input_size == 784
    assert tasks.train_ids.shape == (3, 50) and tasks.memory_ids.shape == (3, 10)
    assert all(len(set(ids)) == 50 for ids in tasks.train_ids)  # drawn without replacement
    slots = np.asarray(ring_buffer_slots(3, 50, 10, 10))
    assert np.array_equal(tasks.memory_ids, np.take_along_axis(tasks.train_ids, slots, 1))
    x, y = tasks.train_inputs(1)
    assert x.shape == (50, 784) and x.dtype == np.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    raw = train[0][tasks.train_ids[1, 0]].reshape(-1)
    expected = np.concatenate([raw, [0]])[tasks.pixel_maps[1]] / 255.0
    np.testing.assert_allclose(x[0], expected, rtol=1e-6)
    assert np.array_equal(y, train[1][tasks.train_ids[1]])
    assert (tasks.angles is not None) == (benchmark == "rotated_mnist")
    other = build_tasks(load_config(None, [*TINY_SETTINGS, "run.seed=1"]), train, test)
    assert not np.array_equal(other.train_ids, tasks.train_ids)
    fixed = build_tasks(
        load_config(None, [*TINY_SETTINGS, "run.seed=1", "tasks.seed=0"]), train, test
    )
    if benchmark == "permuted_mnist":  # tasks.seed fixes the tasks whatever the run's seed
        assert np.array_equal(fixed.pixel_maps, tasks.pixel_maps)


def test_explicit_angles_and_a_test_subset():
    cfg = load_config(
        None,
        [
            *TINY_SETTINGS,
            "tasks.benchmark=rotated_mnist",
            "tasks.angles=[0, 90, 45]",
            "tasks.test_samples=40",
        ],
    )
    tasks = build_tasks(cfg, _images(300, "train"), _images(100, "test"))
    assert tasks.angles.tolist() == [0.0, 90.0, 45.0]
    assert np.array_equal(tasks.pixel_maps[1], rotation_map(90.0))
    assert tasks.test_images.shape == (40, 785) and tasks.test_labels.shape == (40,)


def test_data_smaller_than_the_configuration_is_refused():
    cfg = load_config(None, [*TINY_SETTINGS, "tasks.test_samples=200"])
    with pytest.raises(ConfigError, match="only 100 test images"):
        build_tasks(cfg, _images(300, "train"), _images(100, "test"))
    cfg = load_config(None, TINY_SETTINGS)
    with pytest.raises(ConfigError, match="only 40 training images"):
        build_tasks(cfg, _images(40, "train"), _images(100, "test"))
    with pytest.raises(ConfigError, match="needs 28x28 images"):
        ds = synthetic_dataset(300, (32, 32, 1), 10, seed=0)
        build_tasks(cfg, (ds.images, ds.labels), _images(100, "test"))
