"""The jitted step and the loop: loss goes down, 1 vs 2 devices, exact resume, damaged
checkpoints, NaN policies.

Every run is a ResNet-20 on 8x8 synthetic images, batch 8 (4 steps per epoch
over 32 examples), so one run costs about a compile and a second.
"""

import io
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.train import NonFiniteLossError, Trainer, load_config
from gcgd_jax.train.checkpoint import Checkpointer
from gcgd_jax.train.report import read_metrics
from tests.devices import rerun_with_two_devices

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


RESUME_FIELDS = {"resumed_from_step", "steps_run"}


def _strip_timing(records):
    """Records without timing fields and resume bookkeeping (resume records dropped)."""
    return [
        {k: v for k, v in r.items() if k not in TIMING | RESUME_FIELDS}
        for r in records
        if r["kind"] != "resume"
    ]


def _damage(step_dir):
    """Overwrites every file of a checkpoint's state with junk (a disk error, a bad copy)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"damaged")


def _snapshot(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.replica_state().params)]


# ----------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Per-step losses and final parameters of 5 steps on one batch, on 1 and on 2 devices."""
    out = {}
    for n in (1, 2):
        cfg = load_config(None, [*TINY, f"run.num_devices={n}", "optim.schedule=constant"])
        trainer = Trainer(cfg, out_dir=tmp_path_factory.mktemp(f"dev{n}"))
        images, labels = trainer.train_ds.images[:8], trainer.train_ds.labels[:8]
        losses = [trainer.train_step(images[None], labels[None])[0]["loss"] for _ in range(5)]
        out[n] = (losses, _params(trainer), trainer)
    return out


def test_jitted_train_step_decreases_the_loss(trajectories):
    losses, _, trainer = trajectories[1]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.9 * losses[0], losses
    state = trainer.replica_state()
    assert int(state.step) == 5 and int(state.nonfinite) == 0


def test_two_devices_follow_the_one_device_trajectory(trajectories):
    """Same global batch, state replicated, batch split over 2 devices: BatchNorm statistics
    and gradients are global, so only the order of float32 sums differs. Tolerance: losses
    within 1e-5 relative, parameters within 1e-5 absolute after 5 steps."""
    (l1, p1, t1), (l2, p2, t2) = trajectories[1], trajectories[2]
    assert len(t1.devices) == 1 and len(t2.devices) == 2
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_two_devices_run_and_evaluate_like_one(tmp_path):
    """A whole run() (1 epoch) and evaluate() on 2 devices equal 1 device; the eval set (12)
    is not a multiple of the eval batch (8), so the last batch is padded, and the padded
    result equals an unpadded evaluation (batch 4): padding is not counted."""
    if rerun_with_two_devices(
        __file__, "test_two_devices_run_and_evaluate_like_one"
    ):  # e.g. the user set XLA_FLAGS
        return
    runs = {}
    for n in (1, 2):
        cfg = load_config(
            None,
            [
                *TINY,
                f"run.num_devices={n}",
                "data.synthetic_test_size=12",
                "data.eval_batch_size=8",
                "checkpoint.enabled=false",
            ],
        )
        trainer = Trainer(cfg, out_dir=tmp_path / f"dev{n}")
        (summary,) = trainer.run().values()
        records = read_metrics(tmp_path / f"dev{n}" / "metrics.jsonl")
        runs[n] = (trainer, summary, _strip_timing(records))
    (t1, s1, r1), (t2, s2, r2) = runs[1], runs[2]
    assert s1["devices"] == 1 and s2["devices"] == 2 and len(t1.eval_ds.labels) == 12
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_allclose(r2[0][key], r1[0][key], rtol=1e-5, err_msg=key)
    (e1,), (e2,) = t1.evaluate(), t2.evaluate()
    t2.eval_batch_size = 4  # 3 full batches, no padding
    (unpadded,) = t2.evaluate()
    for key in ("test_loss", "test_acc"):
        np.testing.assert_allclose(e2[key], e1[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(e2[key], unpadded[key], rtol=1e-5, err_msg=key)
        assert e1[key] == pytest.approx(r1[0][key], rel=1e-6)  # run() reported the same


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
    (a_summary,) = a.run().values()
    b = Trainer(cfg, out_dir=b_dir)
    (b_summary,) = b.run(
        stop_at_step=7
    ).values()  # "killed" after step 7; newest checkpoint: step 6
    b_steps = Checkpointer(b_dir / "checkpoints").steps()
    # A copy of the interrupted run whose newest checkpoint (step 6) then gets damaged.
    d_dir = tmp_path_factory.mktemp("damaged_newest") / "run"
    shutil.copytree(b_dir, d_dir)
    _damage(d_dir / "checkpoints" / "6")
    # A checkpoint write that was cut off leaves orbax's temporary folder behind.
    junk = b_dir / "checkpoints" / "7.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "partial").write_bytes(b"\0" * 10)
    c_log = io.StringIO()
    c = Trainer(cfg, out_dir=b_dir, resume=True, stream=c_log)
    (c_summary,) = c.run().values()
    d_log = io.StringIO()
    d = Trainer(cfg, out_dir=d_dir, resume=True, stream=d_log)
    (d_summary,) = d.run().values()
    return {
        "c_log": c_log.getvalue(),
        "d": d,
        "d_dir": d_dir,
        "d_log": d_log.getvalue(),
        "d_summary": d_summary,
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
    assert [x["kind"] for x in c_records] == ["epoch", "resume", "epoch", "summary"]
    assert _strip_timing(c_records) == _strip_timing(a_records)
    # The resumed process restored: it started at step 6 and ran only the last 2 of 8 steps.
    assert "resumed from checkpoint at step 6" in r["c_log"]
    assert c_records[1]["step"] == 6 and c_records[1]["checkpoint"].endswith("checkpoints/6")
    c_summary = r["c_summary"]
    assert c_summary["resumed_from_step"] == 6 and c_summary["steps_run"] == 2 < c_summary["step"]
    assert r["a_summary"]["resumed_from_step"] is None and r["a_summary"]["steps_run"] == 8
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


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(resumed):
    """Step 6 unreadable: the run resumes from step 4, says so, keeps the damaged folder aside
    and still ends exactly like the uninterrupted run."""
    r = resumed
    assert "the checkpoint at step 6 is unreadable" in r["d_log"]
    assert "fell back to the older checkpoint at step 4" in r["d_log"]
    assert (r["d_dir"] / "checkpoints" / "6.damaged" / "state").is_dir()
    assert r["d_summary"]["resumed_from_step"] == 4 and r["d_summary"]["steps_run"] == 4
    d_records = read_metrics(r["d_dir"] / "metrics.jsonl")
    a_records = read_metrics(r["a_dir"] / "metrics.jsonl")
    assert _strip_timing(d_records) == _strip_timing(a_records)
    for x, y in zip(_params(r["a"]), _params(r["d"])):
        np.testing.assert_array_equal(x, y)


def test_every_checkpoint_damaged_is_an_error_that_changes_nothing(tmp_path):
    from gcgd_jax.train import CheckpointError

    cfg = load_config(None, [*TINY, "checkpoint.every_steps=2"])
    Trainer(cfg, out_dir=tmp_path).run()
    assert Checkpointer(tmp_path / "checkpoints").steps() == [2, 4]
    for step in (2, 4):
        _damage(tmp_path / "checkpoints" / str(step))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert read_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(CheckpointError, match=r"no checkpoint can be read \(damaged: step 4, 2\)"):
        Trainer(cfg, out_dir=tmp_path, resume=True).run()
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing truncated, deleted or moved


def test_resume_without_checkpoints_keeps_the_metrics(tmp_path):
    """checkpoint.enabled = false: nothing to resume from, and the finished run's metrics
    are not thrown away by starting again."""
    from gcgd_jax.train import ConfigError

    cfg = load_config(None, [*TINY, "checkpoint.enabled=false"])
    Trainer(cfg, out_dir=tmp_path).run()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="checkpoint.enabled = false, so there is no checkpoint"):
        Trainer(cfg, out_dir=tmp_path, resume=True).run()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


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
    step, state, _ = ckpt.latest(trainer.replica_state()._asdict())
    assert step == 1 and int(state["step"]) == 1 and not bool(state["halted"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["status"] == "nonfinite" and last["step"] == 1

    # Resume it, skipping the bad steps: it starts from the kept state at step 1, every later
    # step is non-finite, so the parameters stay bit for bit those of the checkpoint.
    kept_params = _snapshot(state["params"])
    cfg = cfg.replace(train={"nan_policy": "skip"})
    resumed = Trainer(cfg, out_dir=tmp_path, resume=True)
    (summary,) = resumed.run().values()
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 1
    assert summary["steps_run"] == 7 and summary["nonfinite_steps"] == 7
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["resume", "epoch", "epoch", "summary"]
    assert records[0]["step"] == 1
    for kept, now in zip(kept_params, _params(resumed)):
        np.testing.assert_array_equal(now, kept)


def test_a_skipped_step_leaves_the_state_bit_identical(tmp_path):
    """Under nan_policy=skip a non-finite step changes nothing but the step counters."""
    cfg = load_config(
        None, [*TINY, "optim.lr=1e30", "optim.schedule=constant", "train.nan_policy=skip"]
    )
    trainer = Trainer(cfg, out_dir=tmp_path)
    images, labels = trainer.train_ds.images[:8], trainer.train_ds.labels[:8]
    assert trainer.train_step(images[None], labels[None])[0]["finite"]  # parameters now huge
    s = trainer.replica_state()
    before = [_snapshot(s.params), _snapshot(s.rest), _snapshot(s.opt_state)]
    assert not trainer.train_step(images[None], labels[None])[0]["finite"]
    s = trainer.replica_state()
    after = [_snapshot(s.params), _snapshot(s.rest), _snapshot(s.opt_state)]
    for old, new in zip(before, after):
        for a, b in zip(old, new):
            np.testing.assert_array_equal(b, a)
    assert int(s.step) == 2 and int(s.nonfinite) == 1 and not bool(s.halted)


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
    (summary,) = trainer.run().values()
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 3
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert record["skipped_steps"] == 3 and "val_acc" in record and "test_acc" not in record
    assert all(np.isfinite(p).all() for p in _params(trainer))
    assert (
        json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "summary"
    )


def test_train_epoch_rejects_steps_outside_the_epoch(tmp_path):
    """The public loop seam names a step range that does not lie in the epoch."""
    trainer = Trainer(load_config(None, TINY), out_dir=tmp_path, stream=io.StringIO())
    spe = trainer.steps_per_epoch
    with pytest.raises(ValueError, match=rf"steps 0\.\.{spe + 1} are not inside epoch 0"):
        trainer.train_epoch(0, 0, spe + 1)
    with pytest.raises(ValueError, match="are not inside epoch 1"):
        trainer.train_epoch(1, 0)


def test_epoch_sums_round_trip_and_refuse_keys_of_another_version():
    import dataclasses

    from gcgd_jax.train.trainer import CheckpointError, EpochSums

    sums = EpochSums(loss=1.5, correct=3, examples=8, steps=1, state_metrics={"gc_w_x": 0.5})
    assert EpochSums.from_checkpoint(dataclasses.asdict(sums)) == sums
    with pytest.raises(
        CheckpointError, match=r"keys this version does not know: \['predictor_loss'\]"
    ):
        EpochSums.from_checkpoint({**dataclasses.asdict(sums), "predictor_loss": 0.1})
