"""The jitted step and the loop: loss goes down, 1 vs 2 devices, exact resume, NaN policies.

Every run is a ResNet-20 on 8x8 synthetic images, batch 8 (4 steps per epoch
over 32 examples), so one run costs about a compile and a second.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.train import NonFiniteLossError, Trainer, load_config
from gcgd_jax.train.checkpoint import Checkpointer
from gcgd_jax.train.report import read_metrics

TINY = [
    "data.name=synthetic",
    "data.synthetic_image_shape=[8, 8, 3]",
    "data.synthetic_train_size=32",
    "data.synthetic_test_size=16",
    "data.batch_size=8",
    "optim.lr=0.05",
    "log.progress=false",
]
TIMING = {
    "epoch_time",
    "train_time",
    "eval_time",
    "step_time_median",
    "images_per_s",
    "wall_time",
    "images_per_s_median",
}


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)]


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Per-step losses and final parameters of 5 steps on one batch, on 1 and on 2 devices."""
    out = {}
    for n in (1, 2):
        cfg = load_config(None, [*TINY, f"run.num_devices={n}", "optim.schedule=constant"])
        trainer = Trainer(cfg, out_dir=tmp_path_factory.mktemp(f"dev{n}"))
        images, labels = trainer.train_ds.images[:8], trainer.train_ds.labels[:8]
        losses = [trainer.train_step(images, labels)["loss"] for _ in range(5)]
        out[n] = (losses, _params(trainer), trainer)
    return out


def test_jitted_train_step_decreases_the_loss(trajectories):
    losses, _, trainer = trajectories[1]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert int(trainer.state.step) == 5 and int(trainer.state.nonfinite) == 0


def test_two_devices_follow_the_one_device_trajectory(trajectories):
    """Same global batch, state replicated, batch split over 2 devices: BatchNorm statistics
    and gradients are global, so only the order of float32 sums differs. Tolerance: losses
    within 1e-5 relative, parameters within 1e-5 absolute after 5 steps."""
    (l1, p1, t1), (l2, p2, t2) = trajectories[1], trajectories[2]
    assert len(t1.devices) == 1 and len(t2.devices) == 2
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_batch_size_must_divide_the_device_count(tmp_path):
    from gcgd_jax.train import ConfigError

    with pytest.raises(
        ConfigError, match="data.batch_size = 9 must be divisible by the number of devices"
    ):
        Trainer(load_config(None, [*TINY, "data.batch_size=9"]), out_dir=tmp_path)


# ----------------------------------------------------------------------------- resume


RESUME = [
    *TINY,
    "train.epochs=2",
    "data.augment=crop_flip",  # the augmentation key must continue exactly too
    "checkpoint.every_steps=3",
    "checkpoint.keep=2",
    "corrections.chain=gc_w",  # its state (history, window, predictor) is checkpointed
    "corrections.gc_w.warmup=0",
    "corrections.gc_w.window=2",
]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    cfg = load_config(None, RESUME)
    a_dir, b_dir = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("interrupted")
    a = Trainer(cfg, out_dir=a_dir)
    a_summary = a.run()
    b = Trainer(cfg, out_dir=b_dir)
    b_summary = b.run(stop_at_step=7)  # "killed" after step 7; newest checkpoint: step 6
    b_steps = Checkpointer(b_dir / "checkpoints").steps()
    # A checkpoint write that was cut off leaves orbax's temporary folder behind.
    junk = b_dir / "checkpoints" / "7.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "partial").write_bytes(b"\0" * 10)
    c = Trainer(cfg, out_dir=b_dir, resume=True)
    c_summary = c.run()
    return {
        "a": a,
        "a_dir": a_dir,
        "a_summary": a_summary,
        "b_summary": b_summary,
        "b_steps": b_steps,
        "c": c,
        "b_dir": b_dir,
        "c_summary": c_summary,
    }


def test_resume_continues_exactly(resumed):
    r = resumed
    assert r["b_summary"]["status"] == "stopped" and r["b_summary"]["step"] == 7
    assert r["b_steps"] == [4, 6]  # every 3 steps and at epoch ends, newest 2 kept
    a_records = read_metrics(r["a_dir"] / "metrics.jsonl")
    c_records = read_metrics(r["b_dir"] / "metrics.jsonl")
    assert [x["kind"] for x in c_records] == ["epoch", "epoch", "summary"]
    assert _strip_timing(c_records) == _strip_timing(a_records)
    for x, y in zip(_params(r["a"]), _params(r["c"])):
        np.testing.assert_array_equal(x, y)
    epoch = a_records[0]
    assert {
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "gc_w_predictor_loss",
        "step_time_median",
        "images_per_s",
        "epoch_time",
    } <= set(epoch)
    assert r["a_summary"]["status"] == "completed" and r["c_summary"]["step"] == 8


def test_same_seed_same_metrics(resumed):
    """Two fresh runs (the uninterrupted one and the one stopped at step 7) agree on epoch 1
    bit for bit; the metrics file of the stopped run still holds its own epoch 1 record."""
    a = read_metrics(resumed["a_dir"] / "metrics.jsonl")[0]
    b = read_metrics(resumed["b_dir"] / "metrics.jsonl")[0]
    assert _strip_timing([a]) == _strip_timing([b])


def test_interrupted_checkpoint_write_is_ignored(tmp_path):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(3)}
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(3, state, {"step": 3})
    ckpt.save(5, {**state, "step": jnp.int32(5)}, {"step": 5})
    (tmp_path / "9.orbax-checkpoint-tmp-42" / "state").mkdir(parents=True)  # killed mid-write
    (tmp_path / "7").mkdir()  # a step folder with nothing restorable in it
    with pytest.warns(UserWarning, match="could not be restored"):
        step, restored, meta = Checkpointer(tmp_path).latest(state)
    assert step == 5 and meta == {"step": 5} and int(restored["step"]) == 5
    assert ckpt.save(5, state, {}) is False  # an existing step is never overwritten


def test_resume_refuses_a_different_configuration(resumed):
    from gcgd_jax.train import ConfigError

    cfg = load_config(None, [*RESUME, "optim.lr=0.07"])
    with pytest.raises(
        ConfigError, match=r"differs from the checkpointed run in optim.lr \(0.05 -> 0.07\)"
    ):
        Trainer(cfg, out_dir=resumed["b_dir"], resume=True).run()


# ----------------------------------------------------------------------------- NaN / Inf


def test_nonfinite_loss_stops_with_a_kept_checkpoint(tmp_path):
    # lr 1e30: step 1 is finite, its parameters huge; step 2's loss is NaN.
    cfg = load_config(None, [*TINY, "optim.lr=1e30", "optim.schedule=constant", "train.epochs=2"])
    trainer = Trainer(cfg, out_dir=tmp_path)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2 \(epoch 1, batch 2\)"
    ):
        trainer.run()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [1]
    step, state, _ = ckpt.latest(trainer.state._asdict())
    assert step == 1 and int(state["step"]) == 1 and not bool(state["halted"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["status"] == "nonfinite" and last["step"] == 1


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
    # Also: a validation split carved from train, and train.budget halving the steps.
    cfg = load_config(
        None,
        [
            *TINY,
            "optim.lr=1e30",
            "optim.schedule=constant",
            "train.nan_policy=skip",
            "train.epochs=2",
            "train.budget=0.5",
            "data.val_fraction=0.25",
            "data.eval_split=val",
            "data.synthetic_train_size=48",
        ],
    )
    trainer = Trainer(cfg, out_dir=tmp_path)
    assert len(trainer.train_ds.labels) == 36 and len(trainer.eval_ds.labels) == 12
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 4 and trainer.num_epochs == 1
    summary = trainer.run()
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 3
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert record["skipped_steps"] == 3 and "val_acc" in record and "test_acc" not in record
    assert all(np.isfinite(p).all() for p in _params(trainer))
    assert (
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "summary"
    )
